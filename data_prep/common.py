"""Deprecated: the data-preparation helpers moved to libml (cli, io, names, records, datasets).

Only this alias is left for callers outside data_prep; it goes once they have switched.
"""
from libml import cli

parse_flags = cli.parse
