"""cfbench.evaluators"""
