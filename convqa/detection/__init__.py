"""The detection matrix: every converter mutant against every gate."""
