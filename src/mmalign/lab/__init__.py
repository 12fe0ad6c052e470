"""The synthetic-world lab: the world, its warm-up recipes, the demo, the study and their multi-seed reports.

The lab uses the library (``mmalign.data``, ``models``, ``recipes``, ``eval``, ...); the library never imports the
lab. Only the command line (``mmalign.cli``) sits above both.
"""
