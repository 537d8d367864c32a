"""Ray Train entrypoints: thin layers over rtedit.train, run as python -m jobs.<name> --config jobs/configs/<name>.yaml."""
