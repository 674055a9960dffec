"""Command-line entry points: ``compress`` (the main job) and ``compressor`` (the toolbox)."""
