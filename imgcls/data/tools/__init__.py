"""`imgcls-data`: data tools (MNIST converter, checks, statistics, shards); see `cli.py`."""
