"""The one exception type that means "the user gave us something wrong".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""


class MtplabError(Exception):
    """A problem with the user's input (file, flag, config), reported as one clear line."""
