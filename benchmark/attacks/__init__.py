"""cfbench.attacks"""
