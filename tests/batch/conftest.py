"""Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is first imported (ray_constants), and the first test
module of this folder to import it may be any: set here, before every module of the folder, a Ray started in this
process (a driver under test) stays on 127.0.0.1 instead of the machine's own address. Processes a test starts as
a user would (`ray start` in a loopback-only namespace) get their environment from the test."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
