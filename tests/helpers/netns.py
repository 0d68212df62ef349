"""Two "hosts" on one machine for real multi-node launches: network namespaces, a veth link, an sshd each.

    cluster = TwoHostCluster(workdir)
    cluster.up()                     # raises ClusterUnavailable where namespaces cannot be made
    ... cluster.launcher_cmd([...]) / cluster.launcher_env() ...
    cluster.down()                   # idempotent; kills only what it started, deletes what it made

What `up()` builds (all of it private to this cluster, nothing touches the machine's own network):
  * namespaces `dsd<pid>-n0` and `dsd<pid>-n1`, each with `lo` up;
  * one veth pair created straight into the two namespaces, both ends named `IFNAME` ("dsd0"), so one
    `GLOO_SOCKET_IFNAME` serves every node as on a cluster with uniform NIC names; addresses 10.213.0.1/24 and
    10.213.0.2/24, no default route (traffic can only go between the two namespaces);
  * a throwaway client key and host key, an `authorized_keys` with the client key, and one sshd per namespace
    (`ip netns exec NS /usr/sbin/sshd -D -f CONF`) listening on that namespace's address, port `SSH_PORT`;
  * an ssh config (`Port`, `IdentityFile`, `StrictHostKeyChecking no`, `BatchMode yes`) and a `bin/ssh` wrapper
    that runs `/usr/bin/ssh -F <config>`: OpenSSH reads the *passwd* home's ~/.ssh/config, never $HOME, so the
    wrapper put first on PATH is how pdsh and the deepspeed launcher's own ssh check find the test's config
    without editing /root/.ssh. On a real cluster the same lines go into ~/.ssh/config.

Both namespaces see the same filesystem, so every path (venv, repo, output_dir) exists on both "nodes",
like a shared filesystem on a cluster.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

IFNAME = "dsd0"
SUBNET = "10.213.0"
SSH_PORT = 2222
SSHD = "/usr/sbin/sshd"
REAL_SSH = "/usr/bin/ssh"


class ClusterUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no CAP_NET_ADMIN, no iproute2): the caller should skip."""


def missing_tools() -> list[str]:
    """Programs the cluster needs that are not installed (see tools/install_multihost_deps.sh)."""
    need = {"ip": shutil.which("ip"), "pdsh": shutil.which("pdsh"), "ssh-keygen": shutil.which("ssh-keygen"),
            "sshd": SSHD if os.access(SSHD, os.X_OK) else None,
            "ssh": REAL_SSH if os.access(REAL_SSH, os.X_OK) else None}
    return [name for name, path in need.items() if not path]


def _run(cmd: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


@dataclass
class Node:
    netns: str
    addr: str
    sshd: subprocess.Popen | None = None
    sshd_log: Path | None = None


@dataclass
class TwoHostCluster:
    workdir: Path
    tag: str = field(default_factory=lambda: f"dsd{os.getpid()}")
    nodes: list[Node] = field(default_factory=list)
    _made_netns: list[str] = field(default_factory=list)
    _made_run_sshd: bool = False

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.nodes = [Node(f"{self.tag}-n{i}", f"{SUBNET}.{i + 1}") for i in range(2)]

    # -- paths ------------------------------------------------------------------------------------
    @property
    def ssh_dir(self) -> Path:
        return self.workdir / "ssh"

    @property
    def bin_dir(self) -> Path:
        return self.workdir / "bin"

    @property
    def ssh_config(self) -> Path:
        return self.ssh_dir / "config"

    @property
    def addrs(self) -> list[str]:
        return [n.addr for n in self.nodes]

    # -- bring-up -----------------------------------------------------------------------------------
    def up(self, ready_timeout: float = 30.0) -> "TwoHostCluster":
        if os.geteuid() != 0:
            raise ClusterUnavailable("needs root to create network namespaces (ip netns add)")
        missing = missing_tools()
        if missing:
            raise ClusterUnavailable(f"not installed: {', '.join(missing)} (run tools/install_multihost_deps.sh)")
        first = self.nodes[0].netns
        res = _run(["ip", "netns", "add", first], check=False)
        if res.returncode != 0:
            raise ClusterUnavailable(f"`ip netns add` fails here: {res.stderr.strip()}")
        self._made_netns.append(first)
        try:
            self._make_network()
            self._make_keys()
            self._start_sshds()
            self.wait_ready(ready_timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _make_network(self) -> None:
        n0, n1 = self.nodes
        _run(["ip", "netns", "add", n1.netns])
        self._made_netns.append(n1.netns)
        # Created directly inside the namespaces (never in the machine's own one), same name on both ends.
        _run(["ip", "-n", n0.netns, "link", "add", IFNAME, "type", "veth", "peer", "name", IFNAME,
              "netns", n1.netns])
        for node in self.nodes:
            _run(["ip", "-n", node.netns, "link", "set", "lo", "up"])
            _run(["ip", "-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", IFNAME])
            _run(["ip", "-n", node.netns, "link", "set", IFNAME, "up"])

    def _make_keys(self) -> None:
        self.ssh_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.ssh_dir, 0o700)
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for name in ("id_ed25519", "host_ed25519"):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.tag}-{name}",
                  "-f", str(self.ssh_dir / name)])
        auth = self.ssh_dir / "authorized_keys"
        auth.write_text((self.ssh_dir / "id_ed25519.pub").read_text())
        os.chmod(auth, 0o600)
        hosts = " ".join(self.addrs)
        self.ssh_config.write_text(
            f"Host {hosts}\n"
            f"  Port {SSH_PORT}\n"
            "  User root\n"
            f"  IdentityFile {self.ssh_dir / 'id_ed25519'}\n"
            "  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 10\n"
            "  LogLevel ERROR\n"
        )
        wrapper = self.bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {REAL_SSH} -F {self.ssh_config} "$@"\n')
        os.chmod(wrapper, 0o755)

    def _start_sshds(self) -> None:
        # sshd insists on its privilege-separation directory; packages make it at boot, containers may not.
        run_sshd = Path("/run/sshd")
        if not run_sshd.is_dir():
            run_sshd.mkdir(mode=0o755, parents=True)
            self._made_run_sshd = True
        for i, node in enumerate(self.nodes):
            conf = self.ssh_dir / f"sshd_n{i}.conf"
            conf.write_text(
                f"ListenAddress {node.addr}:{SSH_PORT}\n"
                f"HostKey {self.ssh_dir / 'host_ed25519'}\n"
                f"AuthorizedKeysFile {self.ssh_dir / 'authorized_keys'}\n"
                "PidFile none\n"
                "PermitRootLogin prohibit-password\n"
                "PubkeyAuthentication yes\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"
                "X11Forwarding no\n"
                "PrintMotd no\n"
                "UseDNS no\n"
                "MaxStartups 100\n"
                "LogLevel ERROR\n"
            )
            _run([SSHD, "-t", "-f", str(conf)])
            node.sshd_log = self.ssh_dir / f"sshd_n{i}.log"
            with open(node.sshd_log, "w") as log:
                # `ip netns exec` execs sshd in place, so this pid is the sshd listener's own.
                node.sshd = subprocess.Popen(["ip", "netns", "exec", node.netns, SSHD, "-D", "-e", "-f", str(conf)],
                                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float) -> None:
        """Every node answers ssh from node 0 (where the launcher runs)."""
        deadline = time.monotonic() + timeout
        pending = list(self.addrs)
        last = ""
        while pending:
            for node in self.nodes:
                if node.sshd is not None and node.sshd.poll() is not None:
                    raise RuntimeError(f"sshd in {node.netns} exited ({node.sshd.returncode}): "
                                       f"{node.sshd_log.read_text()[-2000:]}")
            addr = pending[0]
            res = subprocess.run(self.in_node(0, [str(self.bin_dir / "ssh"), addr, "hostname", "-I"]),
                                 capture_output=True, text=True, timeout=30)
            if res.returncode == 0 and addr in res.stdout.split():
                pending.pop(0)
                continue
            last = res.stderr.strip()
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {addr} not reachable after {timeout:.0f}s: {last}")
            time.sleep(0.3)

    # -- use ----------------------------------------------------------------------------------------
    def in_node(self, i: int, cmd: list[str]) -> list[str]:
        """`cmd` run inside node i's namespace."""
        return ["ip", "netns", "exec", self.nodes[i].netns, *cmd]

    def write_hostfile(self, path: Path, slots: int = 1) -> Path:
        path.write_text("".join(f"{a} slots={slots}\n" for a in self.addrs))
        return path

    def launcher_env(self, base: dict | None = None) -> dict:
        """Environment of the launcher on node 0: the ssh wrapper first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def pids(self) -> list[int]:
        """Every process living in one of our namespaces (sshd listeners, sessions, launchers, ranks)."""
        out = []
        for ns in self._made_netns:
            res = _run(["ip", "netns", "pids", ns], check=False)
            out += [int(p) for p in res.stdout.split() if p.isdigit()]
        return out

    def kill_strays(self, keep_sshd: bool = True, grace: float = 5.0) -> list[int]:
        """Stop what a launch left behind in our namespaces (by pid); the sshd listeners stay unless told."""
        keep = {n.sshd.pid for n in self.nodes if keep_sshd and n.sshd is not None and n.sshd.poll() is None}
        victims = [p for p in self.pids() if p not in keep and p != os.getpid()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = []
            for pid in victims:
                try:
                    os.kill(pid, sig)
                    alive.append(pid)
                except ProcessLookupError:
                    pass
            if not alive:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_alive(p) for p in alive):
                time.sleep(0.1)
            victims = [p for p in alive if _alive(p)]
        return victims

    # -- tear-down ----------------------------------------------------------------------------------
    def down(self) -> None:
        """Kill the sshds and everything else in our namespaces (by pid), delete the namespaces and keys."""
        for node in self.nodes:
            if node.sshd is not None and node.sshd.poll() is None:
                node.sshd.terminate()
                try:
                    node.sshd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    node.sshd.kill()
                    node.sshd.wait(timeout=5)
        self.kill_strays(keep_sshd=False)
        for ns in reversed(self._made_netns):
            _run(["ip", "netns", "del", ns], check=False)  # deleting a namespace removes its veth end too
        self._made_netns.clear()
        shutil.rmtree(self.ssh_dir, ignore_errors=True)
        shutil.rmtree(self.bin_dir, ignore_errors=True)
        if self._made_run_sshd:
            # Only if no other sshd could be using it (the machine's own or another test's).
            if not _any_process_named("sshd"):
                shutil.rmtree("/run/sshd", ignore_errors=True)
            self._made_run_sshd = False


def _any_process_named(name: str) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    return True
            except OSError:
                pass
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False
