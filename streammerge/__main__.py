from streammerge.cli import command

command()
