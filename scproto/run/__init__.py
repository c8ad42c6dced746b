"""Run plumbing shared by the entry points: the run directory, checkpoints and resume,
settings validation, and how the command line reports a mistake."""
