"""The softmax bandit playground: watch REINFORCE learn, with and without a baseline.

``policygrad.bandit.core`` holds the bandit, the exact gradient and the runner; ``config`` the CLI's dataclass;
``view`` the live terminal view; ``plot`` the figure.
"""
