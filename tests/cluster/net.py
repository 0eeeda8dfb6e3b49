"""A private network of hosts on this machine: one network namespace per
host, each with a veth into a bridge, so a host can be killed or cut off
for real. Needs root and iproute2. Everything is removed by close().
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

SUBNET = "10.77.{net}.{host}"


def run(*argv, check=True, **kw):
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def wait_until(what, predicate, timeout=30.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - the condition is not true yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Net:
    """A bridge and the namespaces on it."""

    def __init__(self):
        self.tag = f"sd{os.getpid() % 10000}"
        routes = run("ip", "-4", "route").stdout
        self.net = next(n for n in range(77, 250) if f"10.77.{n}." not in routes)
        self.bridge = f"{self.tag}br"
        self.hosts = {}
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", self.ip(1) + "/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        # With br_netfilter loaded (Docker loads it) bridged packets pass
        # the FORWARD chain, whose policy Docker sets to DROP.
        self.forward_rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        self.iptables = shutil.which("iptables")
        if self.iptables:
            run(self.iptables, "-I", *self.forward_rule)

    def ip(self, host):
        return SUBNET.format(net=self.net, host=host)

    def add_host(self, name, host):
        ns = f"{self.tag}-{name}"
        veth, peer = f"{self.tag}{name}", f"{self.tag}{name}p"
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", veth, "master", self.bridge, "up")
        run("ip", "link", "set", peer, "netns", ns)
        run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        run("ip", "netns", "exec", ns, "ip", "link", "set", peer, "name", "eth0")
        run("ip", "netns", "exec", ns, "ip", "addr", "add", self.ip(host) + "/24", "dev", "eth0")
        run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        self.hosts[name] = (ns, veth)
        return ns

    def popen(self, name, argv, log, env=None, user=None):
        ns = self.hosts[name][0]
        prefix = ["ip", "netns", "exec", ns]
        if user:
            prefix += ["runuser", "-u", user, "--"]
        return subprocess.Popen(prefix + argv, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)

    def exec(self, name, *argv):
        return run("ip", "netns", "exec", self.hosts[name][0], *argv)

    def cut(self, name, ip):
        """Host `name` can no longer reach `ip` (packets dropped)."""
        self.exec(name, "ip", "route", "add", "blackhole", ip + "/32")

    def heal(self, name, ip):
        self.exec(name, "ip", "route", "del", "blackhole", ip + "/32")

    def close(self):
        for ns, veth in self.hosts.values():
            run("ip", "link", "del", veth, check=False)
            run("ip", "netns", "del", ns, check=False)
        run("ip", "link", "del", self.bridge, check=False)
        if self.iptables:
            run(self.iptables, "-D", *self.forward_rule, check=False)


class Process:
    """A server process on one host, with its log."""

    def __init__(self, net, host, argv, env=None, user=None, log_dir=None, name=None):
        self.net, self.host, self.argv, self.env, self.user = net, host, argv, env, user
        self.name = name or host
        self.log_path = os.path.join(log_dir, f"{self.name}.log")
        self.proc = None

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = self.net.popen(self.host, self.argv, log, env=self.env, user=self.user)
        log.close()
        return self

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


def http_ok(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as res:
            return res.status == 200
    except Exception:  # noqa: BLE001
        return False


def port_open(ip, port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((ip, port)) == 0


class Postgres:
    def __init__(self, net, host, ip, base):
        bindir = run("sh", "-c", "ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1").stdout.strip()
        self.dir = tempfile.mkdtemp(prefix="pg-", dir=base)
        os.chmod(base, 0o755)
        shutil.chown(self.dir, "postgres")
        data = os.path.join(self.dir, "data")
        run("runuser", "-u", "postgres", "--", f"{bindir}/initdb", "-D", data, "-A", "trust",
            "-U", "postgres", "--no-sync")
        with open(os.path.join(data, "pg_hba.conf"), "a") as f:
            f.write(f"host all all {net.ip(0)}/24 trust\n")
        self.ip = ip
        self.proc = Process(net, host, [f"{bindir}/postgres", "-D", data, "-k", self.dir,
                                        "-c", f"listen_addresses={ip}", "-c", "max_connections=200"],
                            user="postgres", log_dir=base, name="postgres")

    def start(self):
        self.proc.start()
        wait_until("PostgreSQL to listen", lambda: port_open(self.ip, 5432), timeout=60)

    def stop(self):
        self.proc.kill(signal.SIGINT)  # fast shutdown


class Nats:
    def __init__(self, net, host, ip, base):
        self.ip = ip
        self.proc = Process(net, host, ["nats-server", "-a", ip, "-p", "4222"], log_dir=base,
                            name="nats")

    def start(self):
        self.proc.start()
        wait_until("NATS to listen", lambda: port_open(self.ip, 4222), timeout=30)

    def stop(self):
        self.proc.kill(signal.SIGKILL)
