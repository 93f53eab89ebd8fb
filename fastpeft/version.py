# Single source of the version: setup.py reads this file as text (it must not import fastpeft).
__version__ = "0.1.0"
