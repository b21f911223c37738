"""The process's exit statuses, in one place (docs/operations.md lists them for supervisors).

launchd and systemd restart on anything but 0 and CONFIG_ERROR: a bad profile would fail the same
way again (systemd: RestartPreventExitStatus=2).
"""

OK = 0  # a clean stop: drained after SIGTERM / SIGINT
CONFIG_ERROR = 2  # the profile or an override is wrong; one line on stderr names the key
ENGINE_GAVE_UP = 3  # a model's generation thread kept dying, or the server could not start
PEER_FAILED = 4  # a rank of a distributed group died: the whole group restarts
ENGINE_PROCESS_DIED = 70  # an engine process (engine_process: true) ends after its thread died
