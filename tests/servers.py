"""Start and stop local servers in tests: a free port, waiting until it answers, stopping exactly what was started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a server in its own process group (so that stop() ends it and its children, nothing else)."""
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120,
                  any_answer: bool = False) -> None:
    """Until `url` answers with success, or with any HTTP status (a 401 from an auth app) when `any_answer`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            if any_answer:
                return
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{url} did not come up:\n{log.read_text()[-5000:]}") from None
            time.sleep(1)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{url} did not come up:\n{log.read_text()[-5000:]}") from None
            time.sleep(1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(process: subprocess.Popen[bytes]) -> None:
    """End the server's whole process group: SIGTERM, then SIGKILL for anything left after 30 s.

    Waiting for the group leader is not enough: dagster dev's code server can outlive it for a while.
    """
    pgid = process.pid  # start() made the server the leader of a new group
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _group_alive(pgid) and time.monotonic() < deadline:
        process.poll()  # reap the leader once it exits, so it does not linger as a zombie
        time.sleep(0.5)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    process.wait(timeout=10)


def _as_unprivileged(folder: Path) -> tuple[dict[str, object], str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` system user (who gets `folder`);
    otherwise as oneself. Returns Popen keyword arguments and the database user's name."""
    if os.geteuid() != 0:
        import getpass

        return {}, getpass.getuser()
    import pwd

    user = pwd.getpwnam("postgres")
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}, "postgres"


def postgres_binary(name: str) -> str:
    """initdb / pg_ctl / postgres: on the PATH, or in Debian's versioned folder."""
    import shutil

    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        raise AssertionError(f"PostgreSQL's {name} is not installed (Debian: apt-get install postgresql)")
    return str(found)


class PostgresServer:
    """A throwaway PostgreSQL server: initdb into `folder`, listening on a free loopback port only (no Unix socket
    outside the folder), trust authentication for the local user; `url(db)` for SQLAlchemy with psycopg2."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "socket").mkdir(exist_ok=True)
        self.log = folder / "postgres.log"
        self.log.touch()
        self._as, self.user = _as_unprivileged(folder)
        done = subprocess.run([postgres_binary("initdb"), "-D", str(folder / "data"), "-U", self.user, "-A", "trust",
                               "-E", "UTF8", "--no-sync"], capture_output=True, text=True, **self._as)  # type: ignore[arg-type]
        if done.returncode != 0:
            raise AssertionError(f"initdb failed in {folder}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        self.process = subprocess.Popen(
            [postgres_binary("postgres"), "-D", str(folder / "data"), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(folder / "socket"), "-c", "fsync=off"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, **self._as)  # type: ignore[arg-type]
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    stop(self.process)
                    raise AssertionError(f"PostgreSQL did not come up:\n{self.log.read_text()[-3000:]}") from None
                time.sleep(0.3)

    def create_database(self, name: str) -> str:
        import psycopg2

        deadline = time.monotonic() + 30
        while True:  # the port answers a moment before the server accepts logins
            try:
                connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{db}"

    def query(self, db: str, sql: str) -> list[tuple[object, ...]]:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname=db)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql)
                return list(cursor.fetchall())
        finally:
            connection.close()

    def stop(self) -> None:
        """Fast shutdown (SIGINT: open connections are closed, not waited for), then stop()'s escalation."""
        try:
            os.killpg(self.process.pid, signal.SIGINT)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        stop(self.process)
