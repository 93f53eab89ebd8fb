"""fastpeft benchmark suite (`pytest bench`); `python -m bench.report` renders its results."""
