"""The healer's parts: each has a small public surface, its own state, and
returns verdicts; ``SelfHealer`` (selfheal_ext/healer.py) composes them and
records what they decide."""
