"""The bandit playground in the browser: ``policygrad playground`` serves a page on localhost where the reader sets
the arms, the baseline and the step size and watches REINFORCE learn, with the estimators side by side.

``config`` holds the command's dataclass; ``session`` a learner per browser tab, around
:func:`policygrad.bandit.core.bandit_step` (the terminal's loop, one step at a time) and the validation of what a page
sends; ``app`` the Starlette application; ``server`` binds the port and runs it with uvicorn; ``static/`` the page.
"""
