from bsdgraph.cli import entry

entry()
