"""sublim: subliminal-learning experiments as declarative Hydra sweeps."""


class SublimError(Exception):
    """A problem with the user's input or environment, with the fix in its message.

    The entry point prints only the message (no stack trace) and exits non-zero; finished stages
    stay in the store, so rerunning after the fix resumes.
    """
