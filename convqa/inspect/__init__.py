"""The inspect stage: what an artifact contains, as read back by convqa's readers."""
