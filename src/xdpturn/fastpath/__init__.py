from xdpturn.fastpath.api import *  # noqa: F403  (the next commit makes this a plain face)
