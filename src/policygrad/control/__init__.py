"""Classic control with Gymnasium: REINFORCE, A2C, PPO and the natural policy gradient on vectorised environments.

``policygrad control --env CartPole-v1 --algo ppo``. Importing this package is cheap; :mod:`.config` has no heavy
imports, and :func:`.train.run` loads torch and gymnasium when called.
"""
