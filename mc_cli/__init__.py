"""`metacompress`: the command line (chat, compress, evaluate, list); see `mc_cli.main`."""
