//! A real Kubernetes API server for tests: etcd and kube-apiserver on loopback, started once per
//! test binary ([`shared`]), with RBAC on and an admin token, and `kubectl` of the same release.
//!
//! The binaries are built from the pinned `k8s.io/kubernetes` Go module by
//! `scripts/kube-build.sh` into a cache outside the repository. Everything a server writes lives
//! under one directory in `/dev/shm` that is removed when the test binary exits; the processes
//! get SIGKILL when it dies (`PR_SET_PDEATHSIG`), and directories left by a killed run are
//! removed by the next one. Tests share the server, so each names its objects with
//! [`unique`] and a test that runs an operator (which watches every object of a kind) holds
//! [`exclusive`] while it does.

use dog_test_support::{free_port, spawn_kept};
pub use dog_test_support::{unique, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The admin's bearer token (`system:masters`), in the server's token file only.
const ADMIN_TOKEN: &str = "dog-test-admin-token";

/// The cache the binaries are built into (`scripts/kube-build.sh`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("DOG_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/dog")
        })
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The version of `module` that the Go module in `tests/<dir>` pins.
fn pinned(dir: &str, module: &str) -> String {
    let path = repo_root().join("tests").join(dir).join("go.mod");
    let gomod = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    gomod
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(module)).then(|| w.next().map(str::to_string))?
        })
        .unwrap_or_else(|| panic!("{} requires no {module}", path.display()))
}

/// The Kubernetes release pinned in `tests/kubernetes/go.mod`.
pub fn kube_version() -> String {
    pinned("kubernetes", "k8s.io/kubernetes")
}

/// promtool of the Prometheus release pinned in `tests/prometheus/go.mod`.
pub fn promtool() -> PathBuf {
    let p = cache_dir().join(format!(
        "promtool-{}",
        pinned("prometheus", "github.com/prometheus/prometheus")
    ));
    assert!(
        p.exists(),
        "{} not found: run scripts/prom-build.sh (scripts/setup.sh does)",
        p.display()
    );
    p
}

/// A cached binary (`kube-apiserver` or `kubectl`) of the pinned release.
pub fn binary(name: &str) -> PathBuf {
    let p = cache_dir().join(format!("{name}-{}", kube_version()));
    assert!(
        p.exists(),
        "{} not found: run scripts/kube-build.sh (scripts/setup.sh does)",
        p.display()
    );
    p
}

/// Held by a test that runs an operator against the shared server.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

static DIR_TO_REMOVE: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_dir_at_exit() {
    if let Some(d) = DIR_TO_REMOVE.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Removes the directories of earlier runs whose process is gone.
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix("dog-kube-") else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// One etcd and one kube-apiserver.
pub struct ApiServer {
    /// Everything the server writes, and its logs (`etcd.log`, `kube-apiserver.log`).
    pub dir: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// A kubeconfig for the admin.
    pub kubeconfig: PathBuf,
    etcd_port: u16,
    api_port: u16,
    etcd: Mutex<Option<Child>>,
    apiserver: Mutex<Option<Child>>,
}

/// The server shared by every test of this binary, started on first use with the CRDs of
/// `crds/` applied and established.
pub fn shared() -> &'static ApiServer {
    static SERVER: OnceLock<ApiServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let s = ApiServer::start();
        let crds = repo_root().join("crds");
        s.kubectl_ok(&["apply", "-f", crds.to_str().unwrap_or_default()]);
        s.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            crds.to_str().unwrap_or_default(),
        ]);
        s
    })
}

impl ApiServer {
    fn start() -> ApiServer {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        remove_stale_dirs(&base);
        let dir = base.join(format!("dog-kube-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("certs")).expect("server dir");
        if DIR_TO_REMOVE.set(dir.clone()).is_ok() {
            // SAFETY: registering a plain extern "C" function with no captured state.
            unsafe {
                libc::atexit(remove_dir_at_exit);
            }
        }
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},dog-test-admin,dog-test-admin,system:masters\n"),
        )
        .expect("token file");
        let key = dir.join("sa.key");
        let out = Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(&key)
            .output()
            .expect("openssl (scripts/setup.sh installs it)");
        assert!(out.status.success(), "openssl: {out:?}");
        let server = ApiServer {
            url: String::new(),
            kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            etcd_port: free_port(),
            api_port: free_port(),
            etcd: Mutex::new(None),
            apiserver: Mutex::new(None),
        };
        let server = ApiServer {
            url: format!("https://127.0.0.1:{}", server.api_port),
            ..server
        };
        server.start_etcd();
        server.start_apiserver();
        server.wait_ready(90);
        server
    }

    fn log(&self, name: &str) -> Stdio {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .expect("log file");
        Stdio::from(f)
    }

    fn start_etcd(&self) {
        let peer = free_port();
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        cmd.arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args(["--name", "dog-test"])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("dog-test={peer}")])
            .args(["--log-level", "warn"])
            .stdout(self.log("etcd.log"))
            .stderr(self.log("etcd.log"));
        *self.etcd.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(spawn_kept(cmd).unwrap_or_else(|e| panic!("spawning: {e}")));
    }

    fn start_apiserver(&self) {
        let key = self.dir.join("sa.key");
        let mut cmd = Command::new(binary("kube-apiserver"));
        cmd.args([
            "--etcd-servers",
            &format!("http://127.0.0.1:{}", self.etcd_port),
        ])
        .args([
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
        ])
        .args(["--secure-port", &self.api_port.to_string()])
        .arg("--cert-dir")
        .arg(self.dir.join("certs"))
        .arg("--token-auth-file")
        .arg(self.dir.join("tokens.csv"))
        .args(["--authorization-mode", "RBAC"])
        .args([
            "--service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
        ])
        .arg("--service-account-key-file")
        .arg(&key)
        .arg("--service-account-signing-key-file")
        .arg(&key)
        .args(["--service-cluster-ip-range", "10.96.0.0/16"])
        .args(["--enable-priority-and-fairness=false"])
        .stdout(self.log("kube-apiserver.log"))
        .stderr(self.log("kube-apiserver.log"));
        *self.apiserver.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(spawn_kept(cmd).unwrap_or_else(|e| panic!("spawning: {e}")));
    }

    /// Waits until `/readyz` answers ok, then writes the admin kubeconfig.
    pub fn wait_ready(&self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.certificate_authority().is_some() {
                self.write_kubeconfig(&self.kubeconfig, ADMIN_TOKEN, "dog-test-admin");
                let out = self.kubectl(&["get", "--raw", "/readyz"]);
                if out.status.success() {
                    return;
                }
            }
            if let Some(c) = self
                .apiserver
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "kube-apiserver exited ({status}); its log:\n{}",
                        self.tail_log("kube-apiserver.log")
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready after {secs} s; its log:\n{}",
                self.tail_log("kube-apiserver.log")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines of one of the server's logs.
    pub fn tail_log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The server's self-signed serving chain (written once it started).
    fn certificate_authority(&self) -> Option<PathBuf> {
        let p = self.dir.join("certs/apiserver.crt");
        p.exists().then_some(p)
    }

    fn write_kubeconfig(&self, path: &Path, token: &str, user: &str) {
        let ca = self
            .certificate_authority()
            .expect("the server's certificate");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\ncurrent-context: test\n",
            url = self.url,
            ca = ca.display(),
        );
        std::fs::write(path, text).expect("writing a kubeconfig");
    }

    /// Stops kube-apiserver (etcd keeps running), as a control-plane outage does.
    pub fn stop_apiserver(&self) {
        if let Some(mut c) = self
            .apiserver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts kube-apiserver again on the same port and data, and waits until it is ready.
    pub fn restart_apiserver(&self) {
        self.stop_apiserver();
        self.start_apiserver();
        self.wait_ready(90);
    }

    /// `kubectl` of the pinned release as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.kubeconfig, args, None)
    }

    /// `kubectl` with a given kubeconfig, optionally feeding `stdin`.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(binary("kubectl"));
        cmd.env("KUBECONFIG", kubeconfig)
            .current_dir(repo_root())
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning kubectl");
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            pipe.write_all(text.as_bytes()).expect("kubectl stdin");
        }
        child.wait_with_output().expect("kubectl")
    }

    /// `kubectl` as the admin; panics with its output when it fails. Returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Applies YAML from a string as the admin; returns the output or the error text.
    pub fn apply(&self, yaml: &str, extra: &[&str]) -> Result<String, String> {
        let mut args = vec!["apply", "-f", "-"];
        args.extend_from_slice(extra);
        let out = self.kubectl_as(&self.kubeconfig, &args, Some(yaml));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `kubectl get -o json` of one object, `None` when it does not exist.
    pub fn get_json(
        &self,
        resource: &str,
        name: &str,
        ns: Option<&str>,
    ) -> Option<serde_json::Value> {
        let mut args = vec!["get", resource, name, "-o", "json", "--ignore-not-found"];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let text = self.kubectl_ok(&args);
        if text.trim().is_empty() {
            return None;
        }
        serde_json::from_str(&text).ok()
    }

    /// A kubeconfig that authenticates as ServiceAccount `ns/name` with a token from the
    /// TokenRequest API (created if missing). `audience` defaults to the server's.
    pub fn service_account_kubeconfig(&self, ns: &str, name: &str) -> PathBuf {
        let _ = self.kubectl(&["create", "namespace", ns]);
        let _ = self.kubectl(&["-n", ns, "create", "serviceaccount", name]);
        let token = self.kubectl_ok(&["-n", ns, "create", "token", name, "--duration", "2h"]);
        let path = self.dir.join(format!("sa-{ns}-{name}.kubeconfig"));
        self.write_kubeconfig(&path, token.trim(), &format!("{ns}-{name}"));
        path
    }
}

impl ApiServer {
    /// Applies the operator's identity exactly as the chart installs it: the Namespace, the
    /// ServiceAccounts and the RBAC objects of `manifests/dog.yaml` (which `scripts/check-k8s.sh`
    /// proves equal to the chart rendered by Helm with default values), and returns a
    /// kubeconfig that authenticates as the `dog-operator` ServiceAccount.
    pub fn chart_operator_kubeconfig(&self) -> PathBuf {
        const KINDS: [&str; 6] = [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ];
        let text = std::fs::read_to_string(repo_root().join("manifests/dog.yaml"))
            .expect("manifests/dog.yaml");
        let docs: Vec<&str> = text
            .split("\n---")
            .filter(|d| {
                d.lines()
                    .any(|l| KINDS.iter().any(|k| l.trim_end() == format!("kind: {k}")))
            })
            .collect();
        assert!(docs.len() >= 6, "RBAC objects in manifests/dog.yaml");
        let yaml = docs.join("\n---\n");
        if let Err(e) = self.apply(&yaml, &[]) {
            panic!("applying the chart's RBAC: {e}");
        }
        self.service_account_kubeconfig(CHART_NAMESPACE, "dog-operator")
    }

    /// What the kubelet gives the agent's DaemonSet pod on `node`: a Pod of the chart's
    /// `dog-agent` ServiceAccount bound to the node (created here; nothing runs it), and a
    /// token for that Pod with dog's audience, as the chart's projected volume requests it.
    /// Returns the token (needs [`Self::chart_operator_kubeconfig`] first, for the account).
    pub fn agent_pod_token(&self, node: &str, audience: &str) -> String {
        let pod = format!("dog-agent-{node}");
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {CHART_NAMESPACE}, labels: {{app.kubernetes.io/component: agent}}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: dog-agent\n  automountServiceAccountToken: false\n  containers: [{{name: agent, image: dog-agent}}]\n"
        );
        if let Err(e) = self.apply(&yaml, &[]) {
            panic!("creating Pod {pod}: {e}");
        }
        self.kubectl_ok(&[
            "-n",
            CHART_NAMESPACE,
            "create",
            "token",
            "dog-agent",
            "--audience",
            audience,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            &pod,
            "--duration",
            "1h",
        ])
        .trim()
        .to_string()
    }

    /// Deletes every dog object, Node, agent Pod and leader Lease, so that an operator starts
    /// on an empty cluster (the caller holds [`exclusive`]).
    pub fn reset(&self) {
        self.kubectl_ok(&[
            "delete",
            "groups.dogfw.io,profiles.dogfw.io,zones.dogfw.io,hosts.dogfw.io,nodes",
            "--all",
        ]);
        let _ = self.kubectl(&["-n", CHART_NAMESPACE, "delete", "leases", "--all"]);
        let _ = self.kubectl(&[
            "-n",
            CHART_NAMESPACE,
            "delete",
            "pods",
            "--all",
            "--grace-period=0",
            "--force",
        ]);
    }
}

/// The namespace the chart installs into.
pub const CHART_NAMESPACE: &str = "dog-system";
