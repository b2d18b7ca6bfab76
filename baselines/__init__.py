"""Built-in defenses of cfbench, registered through the same entry points as any plugin."""
