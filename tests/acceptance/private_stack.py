"""A second local stack, private to the tests that stop and start its services.

Restarting the shared stack would cut every other test running against it. And
its ports lie inside Linux's ephemeral range (32768-60999): while the broker is
down, a client that keeps reconnecting can be handed the broker's own port as its
source port and connect to itself, and the broker then cannot bind on restart.
aiokafka reconnects in a tight loop while a produce is pending, which makes that
likely within seconds. The private stack listens below the range.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

from worker import stack

PG_PORT = 25432
KAFKA_PORT = 29092
KAFKA_CONTROLLER_PORT = 29093
CALL_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class PrivateStack:
    state_dir: pathlib.Path

    @property
    def database_url(self) -> str:
        return f"postgresql://{stack.PG_USER}@{stack.HOST}:{PG_PORT}/postgres"

    @property
    def kafka_bootstrap_servers(self) -> str:
        return f"{stack.HOST}:{KAFKA_PORT}"

    def up(self) -> None:
        # The broker's jars are the shared stack's: fetching them again would
        # need Maven and the network.
        shared_dir = os.environ.get("CONVSTATS_STACK_DIR") or stack.REPO_ROOT / ".stack"
        shared = pathlib.Path(shared_dir) / "kafka" / "libs"
        libs = self.state_dir / "kafka" / "libs"
        if shared.is_dir() and not libs.exists():
            libs.parent.mkdir(parents=True, exist_ok=True)
            libs.symlink_to(shared, target_is_directory=True)
        self._call("up")

    def down(self) -> None:
        self._call("down")

    def stop_postgresql(self) -> None:
        self._call("stop_postgresql")

    def start_postgresql(self) -> None:
        self._call("start_postgresql")

    def stop_kafka(self) -> None:
        self._call("stop_kafka")

    def start_kafka(self) -> None:
        self._call("start_kafka")

    def _call(self, function: str) -> None:
        # A process of its own: the stack reads its ports from the environment,
        # which this process shares with the fixtures of the shared stack.
        done = subprocess.run(
            [sys.executable, "-c", f"from worker import stack; stack.{function}()"],
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CALL_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"stack.{function}() failed:\n{done.stderr[-4000:]}")

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSTATS_")}
        env.update(
            CONVSTATS_STACK_DIR=str(self.state_dir),
            CONVSTATS_STACK_PG_PORT=str(PG_PORT),
            CONVSTATS_STACK_KAFKA_PORT=str(KAFKA_PORT),
            CONVSTATS_STACK_KAFKA_CONTROLLER_PORT=str(KAFKA_CONTROLLER_PORT),
        )
        return env
