"""The one exception type for user mistakes: the CLI turns it into exit code 2 and one line."""


class UsageError(Exception):
    """Bad configuration, bad task or bad environment: the message names the key and the fix."""


EXIT_OK = 0
EXIT_USAGE = 2
