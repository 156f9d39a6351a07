"""Multi-node deployment: certificates, node keys, the SuperLink/SuperNode command lines,
and docker-compose.yml, from one place.

The compose file is generated from the same functions that the real-process deployment
test runs (`superlink_command`, `supernode_command`, `register_command`), so the flags
the containers use are the flags the test exercised. `dpfl deploy compose` rewrites it;
a test checks that the committed file is what this module generates.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

from common import FLOWER_ENV, roster

PORT = 9093  # the SuperLink's one port (Fleet, Control and ServerAppIo APIs)
CERTS = "certs"  # folder with ca.crt, server.crt/.key, node-<i>(.pub) keys, roster.json
ROSTER = "roster.json"  # the members' identity (= authentication) public keys
CONNECTION = "dpfl"  # the `flwr` connection name in FLWR_HOME/config.toml
EVAL_HOLDOUT = 0.1  # a compose node's share of records kept for federated evaluation


# ---- certificates and node keys ------------------------------------------------------


def make_certs(out: Path, *, num_nodes: int, hosts: tuple[str, ...] = ("superlink", "localhost"),
               ips: tuple[str, ...] = ("127.0.0.1",), if_missing: bool = False, days: int = 365,
               issuer: roster.PrivateKey | None = None) -> list[Path]:
    """A CA, the SuperLink's TLS certificate (for `hosts` and `ips`) and one ECDSA key pair
    per SuperNode (OpenSSH format, as Flower's node authentication reads them). Existing
    files are never overwritten: with `if_missing`, only what is missing is made (node keys
    for new nodes); otherwise existing files are an error. The roster (roster.json) is
    made from the node keys every time, signed by `issuer` if given. Returns the files
    written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write(path: Path, data: bytes, mode: int = 0o644) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        written.append(path)

    tls = [out / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")]
    if any(p.exists() for p in tls) and not if_missing:
        raise FileExistsError(f"{out} already holds certificates; delete them to make new ones")
    if not all(p.exists() for p in tls):
        if any(p.exists() for p in tls):
            raise FileExistsError(f"{out} holds only part of a CA and server certificate; "
                                  "delete ca.* and server.* to make new ones")
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dpfl CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=days))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP384R1())
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        pem = serialization.Encoding.PEM
        write(out / "ca.crt", ca.public_bytes(pem))
        write(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()), 0o600)
        write(out / "server.crt", cert.public_bytes(pem))
        write(out / "server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()), 0o600)
    for i in range(num_nodes):
        priv, pub = node_key_paths(out, i)
        if priv.exists() and pub.exists():
            continue
        if priv.exists() or pub.exists():
            raise FileExistsError(f"{out}: only one half of node {i}'s key pair exists")
        node_key = ec.generate_private_key(ec.SECP384R1())
        write(priv, node_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()), 0o600)
        write(pub, node_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH))
    # The federation's roster for secure aggregation: every node's authentication public
    # key by partition (derived from the .pub files, so rewritten as nodes are added).
    members, i = {}, 0
    while node_key_paths(out, i)[1].exists():
        members[i] = node_key_paths(out, i)[1].read_text()
        i += 1
    roster.write_roster(out / ROSTER, members, issuer=issuer)
    written.append(out / ROSTER)
    return written


def node_key_paths(certs: Path, i: int) -> tuple[Path, Path]:
    return certs / f"node-{i}", certs / f"node-{i}.pub"


# ---- command lines (used by the test and by docker-compose.yml) ----------------------


def superlink_command(*, host: str, port: int, certs: str, database: str,
                      insecure: bool = False) -> list[str]:
    """A SuperLink with TLS and node authentication (only registered nodes may connect),
    its state in `database` so runs survive a restart, apps run as subprocesses."""
    cmd = ["flower-superlink", "--host", host, "--port", str(port), "--database", database,
           "--isolation", "subprocess", "--disable-runtime-dependency-installation"]
    if insecure:
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-ca-certfile", f"{certs}/ca.crt", "--ssl-certfile", f"{certs}/server.crt",
            "--ssl-keyfile", f"{certs}/server.key", "--enable-supernode-auth"]


def supernode_command(i: int, *, num_nodes: int, superlink: str, certs: str, state_dir: str,
                      port: int, data_dir: str = "", insecure: bool = False,
                      max_epsilon: float = 8.0, max_delta: float = 1e-5,
                      own_data: str = "", eval_holdout: float = 0.0) -> list[str]:
    """SuperNode `i`: its partition of the data (or its own `data_dir`), its privacy ledger
    in `state_dir` (a file that outlives restarts and runs), its privacy policy (DP
    required, at most `max_epsilon` at `max_delta`: runs asking for less privacy are
    refused), its authentication key. `own_data`: node config for records of its own in a
    table or image format (`dataset=... label-column=... classes=...`). `eval_holdout`:
    the share of its records it keeps out of training for federated evaluation."""
    node_config = (f"partition-id={i} num-partitions={num_nodes} "
                   f"ledger-path=\"{state_dir}/ledger.json\" require-dp=true "
                   f"max-epsilon={max_epsilon!r} max-delta={max_delta!r}")
    if not insecure:  # its authentication key is its identity in secure aggregation
        node_config += (f' identity-key="{node_key_paths(Path(certs), i)[0]}" '
                        f'roster="{certs}/{ROSTER}"')
    if data_dir:
        node_config += f' data-dir="{data_dir}"'
    if own_data:
        node_config += f" {own_data}"
    if eval_holdout:
        node_config += f" eval-holdout={eval_holdout!r}"
    cmd = ["flower-supernode", "--superlink", superlink, "--node-config", node_config,
           "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port)]
    if insecure:
        return [*cmd, "--insecure"]
    priv, _ = node_key_paths(Path(certs), i)  # Flower derives the public key from it
    return [*cmd, "--root-certificates", f"{certs}/ca.crt", "--auth-supernode-private-key", str(priv)]


def register_command(i: int, *, certs: str) -> list[str]:
    """Registers node `i`'s public key with the SuperLink of connection CONNECTION."""
    return ["flwr", "supernode", "register", str(node_key_paths(Path(certs), i)[1]), CONNECTION]


def connection_toml(address: str, certs: str, *, insecure: bool = False) -> str:
    """FLWR_HOME/config.toml naming the SuperLink as connection CONNECTION."""
    if insecure:
        return f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    return (f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
            f'root-certificates = "{certs}/ca.crt"\n')


# ---- docker-compose.yml ----------------------------------------------------------------


def compose(num_nodes: int = 3, *, insecure: bool = False, max_epsilon: float = 8.0,
            max_delta: float = 1e-5, eval_holdout: float = EVAL_HOLDOUT) -> dict[str, Any]:
    """The compose project: `init` makes certificates and keys (once), `superlink` keeps its
    database on a volume, `register` registers every node's key, `node-<i>` are the
    SuperNodes, each with its own state volume (its privacy ledger) and `eval_holdout` of
    its records kept for federated evaluation (a federation's runs evaluate there:
    `evaluation="federated"`)."""
    image = {"build": ".", "image": "dpfl:latest"}
    env = dict(FLOWER_ENV)
    certs = "/certs"
    healthy_port = ["CMD", "python", "-c",
                    f"import socket; socket.create_connection(('localhost', {PORT}), 3)"]
    services: dict[str, Any] = {
        "init": {
            **image, "command": ["dpfl", "deploy", "certs", "--out", certs, "--nodes", str(num_nodes),
                                 "--if-missing"],
            "volumes": ["./deploy/certs:/certs"], "restart": "no",
        },
        "superlink": {
            **image, "environment": {**env, "DPFL_CACHE_DIR": "/state/cache"},
            "command": superlink_command(host="0.0.0.0", port=PORT, certs=certs,
                                         database="/state/superlink.db", insecure=insecure),
            "ports": [f"{PORT}:{PORT}"],
            "volumes": ["./deploy/certs:/certs:ro", "superlink-state:/state", "./runs:/app/runs"],
            "working_dir": "/app",
            "depends_on": {"init": {"condition": "service_completed_successfully"}},
            "healthcheck": {"test": healthy_port, "interval": "5s", "timeout": "5s", "retries": 12},
            "restart": "unless-stopped",
        },
        "register": {
            **image, "environment": {**env, "FLWR_HOME": "/tmp/flwr"},
            "entrypoint": ["sh", "-c"],
            "command": [
                "mkdir -p /tmp/flwr && printf '%s' \"$$CONNECTION\" > /tmp/flwr/config.toml && "
                + " && ".join(f"({' '.join(register_command(i, certs=certs))} || true)"
                              for i in range(num_nodes))
            ],
            "volumes": ["./deploy/certs:/certs:ro"],
            "depends_on": {"superlink": {"condition": "service_healthy"}},
            "restart": "no",
        },
    }
    services["register"]["environment"]["CONNECTION"] = connection_toml(
        f"superlink:{PORT}", certs, insecure=insecure)
    for i in range(num_nodes):
        services[f"node-{i}"] = {
            **image, "environment": {**env, "DPFL_CACHE_DIR": "/state/cache"},
            "command": supernode_command(i, num_nodes=num_nodes, superlink=f"superlink:{PORT}",
                                         certs=certs, state_dir="/state", port=9094,
                                         insecure=insecure, max_epsilon=max_epsilon,
                                         max_delta=max_delta, eval_holdout=eval_holdout),
            "volumes": ["./deploy/certs:/certs:ro", f"node-{i}-state:/state"],
            "depends_on": {"register": {"condition": "service_completed_successfully"}},
            "restart": "unless-stopped",
        }
    volumes: dict[str, Any] = {"superlink-state": {}, **{f"node-{i}-state": {} for i in range(num_nodes)}}
    return {"services": services, "volumes": volumes}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, dict):
        raise TypeError("nested mappings are written as blocks")
    return json.dumps(str(value))


def to_yaml(data: dict[str, Any], indent: int = 0) -> str:
    """A small YAML writer for compose files: nested mappings as blocks, lists of scalars
    in flow style, strings JSON-quoted (which YAML reads as they are)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            lines.append(f"{'  ' * indent}{key}:")
            lines.append(to_yaml(value, indent + 1))
        else:
            lines.append(f"{'  ' * indent}{key}: {_scalar(value)}")
    return "\n".join(lines)


HEADER = """\
# Generated by `dpfl deploy compose --nodes {n}` from simulations/deploy.py: the same
# command lines the real-process deployment test (tests/test_deploy.py) runs.
# Start: `docker compose up -d --build`; run: see README "Run on several machines".
"""


def compose_yaml(num_nodes: int = 3, *, insecure: bool = False, max_epsilon: float = 8.0,
                 max_delta: float = 1e-5, eval_holdout: float = EVAL_HOLDOUT) -> str:
    return HEADER.format(n=num_nodes) + to_yaml(compose(
        num_nodes, insecure=insecure, max_epsilon=max_epsilon, max_delta=max_delta,
        eval_holdout=eval_holdout)) + "\n"
