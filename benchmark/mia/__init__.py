"""cfbench.mia"""
