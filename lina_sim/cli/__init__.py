"""Sub-commands of ``lina-sim``; each module registers its own argparse parsers."""
