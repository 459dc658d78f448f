"""Lifelong evaluation: the runner, metrics and scoring, reports, plots, experiment logging, saved edits."""
