from bsdgraph.cli.main import entry

entry()
