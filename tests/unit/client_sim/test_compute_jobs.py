"""A compute job, as the fleet sends it to a compute process, loads no device networking."""

import pickle
import subprocess
import sys

from client_sim import fleet
from client_sim.device import ComputeJob

# What a compute process must not import to run a job: the devices' HTTP client and sessions.
_NETWORK_MODULES = ("httpx", "client_sim.protocol", "client_sim.device", "client_sim.fleet")
_PROBE = (
    "import pickle, sys\n"
    "pickle.loads(sys.stdin.buffer.read())\n"
    f"print(','.join(m for m in {_NETWORK_MODULES!r} if m in sys.modules))\n"
)


def test_unpickling_the_fleets_job_and_its_function_imports_no_device_networking():
    # Arrange: the function and job exactly as Fleet._compute submits them to the pool
    job = ComputeJob("device-0", b"plan", b"checkpoint", (b"record",))
    payload = pickle.dumps((fleet.run_compute_job, job))
    # Act: a fresh interpreter, as a spawned compute process is
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], input=payload, capture_output=True, check=True
    )
    # Assert
    assert out.stdout.decode().strip() == ""
