"""SHM102: a `global` name rebound inside a function."""
current_user = None
mode = "normal"
_config = None


def login(user):
    global current_user
    current_user = user  # expect: SHM102
    current_user = user.lower()  # one finding per function and name


def set_mode(m):
    global mode
    for mode in (m,):  # expect: SHM102
        pass


def no_global(user):
    current_user = user  # a local
    return current_user


def get_config():
    # Lazy initialisation: computed once, the same in every worker.
    global _config
    if _config is None:
        _config = {"debug": False}
    return _config


def setup_logging():
    # set-up functions run once at start
    global mode
    mode = "verbose"


def outer():
    def inner(u):
        global current_user
        current_user = u  # expect: SHM102
    return inner


if __name__ == "__main__":
    def main():
        global mode
        mode = "cli"
