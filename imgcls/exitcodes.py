"""Exit statuses shared by the trainer and the launcher (no torch here: the launcher imports it)."""
EXIT_USAGE = 2      # a recipe or data problem the user must fix; the message says what
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; run the printed command
