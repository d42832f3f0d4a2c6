from lmsqueeze.cli import entry

entry()
