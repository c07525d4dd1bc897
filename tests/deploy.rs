//! The deploy files, checked with the tools their users run: the Kubernetes manifests
//! against the API schemas (`kubernetes-validate --strict`, from PyPI; `.ci/run`
//! installs it), the lb.yaml each ConfigMap carries with `lb check`, the pods' grace
//! period against the longest stop it prints, and the Prometheus alerts with their unit
//! tests (`promtool test rules`), which must cover every alert.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

const LB: &str = env!("CARGO_BIN_EXE_lb");

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every manifest in deploy/kubernetes/.
fn manifests() -> Vec<PathBuf> {
    let dir = deploy().join("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "manifests in {}: {files:?}",
        dir.display()
    );
    files
}

/// The documents of a YAML text, empty ones (a leading comment block) left out.
fn documents(text: &str, what: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("{what} is not YAML: {e}"))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Runs a command; its exit status and everything it printed.
fn run(cmd: &mut Command, install: &str) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?} could not run ({e}): {install}");
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn kubernetes_validate(files: &[PathBuf]) -> (bool, String) {
    run(
        Command::new("kubernetes-validate")
            .arg("--strict")
            .args(files),
        "install it with `pip install kubernetes-validate` (.ci/run does)",
    )
}

fn promtool(args: &[&str], file: &Path) -> (bool, String) {
    run(
        Command::new("promtool").args(args).arg(file),
        "install Debian's package prometheus (.ci/run does)",
    )
}

#[test]
fn every_manifest_passes_the_kubernetes_api_schemas() {
    let files = manifests();
    let (ok, output) = kubernetes_validate(&files);
    assert!(ok, "kubernetes-validate --strict:\n{output}");
    let objects: usize = files
        .iter()
        .map(|f| documents(&read(f), &f.display().to_string()).len())
        .sum();
    assert_eq!(
        output.matches("passed for resource").count(),
        objects,
        "every object validated:\n{output}"
    );
}

#[test]
fn kubernetes_validate_rejects_a_misspelled_key() {
    let text = read(&deploy().join("kubernetes/lb-in-app-pod.yaml"));
    // A typo that would quietly leave the root filesystem writable; only --strict sees it.
    let typo = text.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem");
    assert_ne!(typo, text, "the manifest sets readOnlyRootFilesystem");
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("lb-in-app-pod.yaml");
    std::fs::write(&copy, typo).expect("write the copy");
    let (ok, output) = kubernetes_validate(&[copy]);
    assert!(!ok, "a misspelled key passed:\n{output}");
    assert!(
        output.contains("'readOnlyRootFileSystem' was unexpected"),
        "the error names the key:\n{output}"
    );
}

/// `lb check` on a config text saved as `dir/lb.yaml`: the longest stop it prints, in
/// whole seconds, or what it printed if the config is invalid.
fn lb_check(text: &str, dir: &Path) -> Result<u64, String> {
    std::fs::create_dir_all(dir).expect("config dir");
    let path = dir.join("lb.yaml");
    std::fs::write(&path, text).expect("write lb.yaml");
    let (ok, output) = run(
        Command::new(LB).arg("check").arg("--config").arg(&path),
        "build lb",
    );
    if !ok {
        return Err(output);
    }
    let seconds = output
        .lines()
        .find_map(|line| line.strip_prefix("longest stop: "))
        .and_then(|rest| rest.split_once("s ("))
        .and_then(|(secs, _)| secs.parse().ok());
    seconds.ok_or_else(|| format!("no `longest stop: Ns (…)` line in:\n{output}"))
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn namespace(doc: &Value) -> &str {
    doc["metadata"]["namespace"].as_str().unwrap_or("default")
}

/// Whether every label of `selector` is among `labels` (and there is at least one).
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// A CPU quantity that is a whole number of CPUs: what `count: auto` can use in full.
fn whole_cpus(quantity: &Value) -> bool {
    match quantity {
        Value::Number(n) => n.as_u64().is_some_and(|n| n > 0),
        Value::String(s) => match s.strip_suffix('m') {
            Some(milli) => milli.parse::<u64>().is_ok_and(|m| m > 0 && m % 1000 == 0),
            None => s.parse::<u64>().is_ok_and(|n| n > 0),
        },
        _ => false,
    }
}

/// What is wrong with one manifest file's objects as an lb deployment, one line each;
/// `scratch` is a folder for the lb.yaml files taken out of the ConfigMaps.
fn problems(docs: &[Value], scratch: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    // ConfigMap name -> (longest stop in seconds, its lb.yaml parsed).
    let mut configs: HashMap<&str, (u64, Value)> = HashMap::new();
    for cm in docs.iter().filter(|d| kind(d) == "ConfigMap") {
        let Some(text) = cm["data"]["lb.yaml"].as_str() else {
            continue;
        };
        match lb_check(text, &scratch.join(name(cm))) {
            Ok(longest) => {
                let config = documents(text, name(cm)).pop().unwrap_or_default();
                configs.insert(name(cm), (longest, config));
            }
            Err(output) => problems.push(format!(
                "ConfigMap {}: lb check rejects its lb.yaml: {}",
                name(cm),
                output.trim()
            )),
        }
    }
    if configs.is_empty() && problems.is_empty() {
        problems.push("no ConfigMap with an lb.yaml".into());
    }
    let deployments: Vec<&Value> = docs.iter().filter(|d| kind(d) == "Deployment").collect();
    let mut lb_containers = 0;
    for d in &deployments {
        let what = format!("Deployment {}", name(d));
        let pod = &d["spec"]["template"]["spec"];
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        if d["spec"]["strategy"]["type"] != "RollingUpdate" {
            problems.push(format!("{what}: strategy is not RollingUpdate"));
        }
        if !docs.iter().any(|p| {
            kind(p) == "PodDisruptionBudget"
                && selects(&p["spec"]["selector"]["matchLabels"], labels)
        }) {
            problems.push(format!("{what}: no PodDisruptionBudget selects its pods"));
        }
        if pod["securityContext"]["runAsNonRoot"] != true
            || pod["securityContext"]["runAsUser"] != 10001
        {
            problems.push(format!("{what}: pod not runAsNonRoot as user 10001"));
        }
        // Kubernetes' default when the field is left out.
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        for c in pod["containers"].as_array().into_iter().flatten() {
            let what = format!("{what}, container {}", c["name"].as_str().unwrap_or("?"));
            let sc = &c["securityContext"];
            if sc["allowPrivilegeEscalation"] != false
                || sc["readOnlyRootFilesystem"] != true
                || !strings(&sc["capabilities"]["drop"]).contains(&"ALL")
            {
                problems.push(format!(
                    "{what}: securityContext needs allowPrivilegeEscalation false, \
                     readOnlyRootFilesystem true, capabilities drop ALL"
                ));
            }
            // lb's containers: those that mount a ConfigMap carrying an lb.yaml.
            for mount in c["volumeMounts"].as_array().into_iter().flatten() {
                let volume = pod["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["name"] == mount["name"]);
                let Some(cm) = volume.and_then(|v| v["configMap"]["name"].as_str()) else {
                    continue;
                };
                let Some((longest, config)) = configs.get(cm) else {
                    continue;
                };
                lb_containers += 1;
                let path = format!("{}/lb.yaml", mount["mountPath"].as_str().unwrap_or("?"));
                if !strings(&c["args"])
                    .windows(2)
                    .any(|w| w[0] == "--config" && w[1] == path)
                {
                    problems.push(format!("{what}: args do not pass --config {path}"));
                }
                if grace <= *longest {
                    problems.push(format!(
                        "{what}: terminationGracePeriodSeconds {grace} is not above the \
                         longest stop `lb check` prints for ConfigMap {cm}, {longest}s"
                    ));
                }
                // The admin API stays on loopback, so the probes run lb in the container.
                // Left out, it is 127.0.0.1:9900; null turns it off, and the probes with it.
                let admin = match config.get("admin").and_then(|a| a.get("listen")) {
                    None => "127.0.0.1:9900",
                    Some(listen) => listen.as_str().unwrap_or("off"),
                };
                if !admin
                    .parse::<SocketAddr>()
                    .is_ok_and(|a| a.ip().is_loopback())
                {
                    problems.push(format!("{what}: admin.listen {admin} is not loopback"));
                }
                for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                    if c[probe].is_null() {
                        if probe == "readinessProbe" {
                            problems.push(format!("{what}: no readinessProbe"));
                        }
                        continue;
                    }
                    let argv = strings(&c[probe]["exec"]["command"]);
                    let lb = |sub: &str| argv == ["lb", sub, "--config", path.as_str()];
                    let ok = if probe == "livenessProbe" {
                        lb("health") || lb("status")
                    } else {
                        lb("health")
                    };
                    if !ok {
                        problems.push(format!(
                            "{what}: {probe} is not `lb health --config {path}` (exec)"
                        ));
                    }
                }
                // count: auto (the default) is the CPUs of the quota, in whole CPUs.
                for svc in config["services"].as_array().into_iter().flatten() {
                    let workers = &svc["workers"];
                    let auto = workers["count"].is_null() || workers["count"] == "auto";
                    if workers.is_object() && auto && !whole_cpus(&c["resources"]["limits"]["cpu"])
                    {
                        problems.push(format!(
                            "{what}: service {} has count auto but limits.cpu is not a \
                             whole number of CPUs",
                            svc["name"].as_str().unwrap_or("?")
                        ));
                    }
                }
            }
        }
    }
    if lb_containers == 0 {
        problems.push("no container mounts an lb.yaml".into());
    }
    for s in docs
        .iter()
        .filter(|d| kind(d) == "Service" || kind(d) == "PodDisruptionBudget")
    {
        let selector = if kind(s) == "Service" {
            &s["spec"]["selector"]
        } else {
            &s["spec"]["selector"]["matchLabels"]
        };
        if !deployments
            .iter()
            .any(|d| selects(selector, &d["spec"]["template"]["metadata"]["labels"]))
        {
            problems.push(format!("{} {}: selects no pod", kind(s), name(s)));
        }
    }
    // A backend named by a Service's DNS name is a headless Service of this file.
    for (cm, (_, config)) in &configs {
        for svc in config["services"].as_array().into_iter().flatten() {
            for backend in svc["backends"].as_array().into_iter().flatten() {
                let address = backend
                    .as_str()
                    .or_else(|| backend["address"].as_str())
                    .unwrap_or_default();
                let Some((host, port)) = address.rsplit_once(':') else {
                    continue;
                };
                let Some(service) = host
                    .strip_suffix(".svc.cluster.local.")
                    .or_else(|| host.strip_suffix(".svc.cluster.local"))
                else {
                    continue;
                };
                let found = docs.iter().find(|d| {
                    kind(d) == "Service" && format!("{}.{}", name(d), namespace(d)) == service
                });
                let port_listed = |d: &Value| {
                    d["spec"]["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["port"].as_u64().is_some_and(|n| n.to_string() == port))
                };
                match found {
                    None => problems.push(format!(
                        "ConfigMap {cm}: backend {address}: no Service {service} in this file"
                    )),
                    Some(d) if d["spec"]["clusterIP"] != "None" => problems.push(format!(
                        "ConfigMap {cm}: backend {address}: Service {service} is not headless"
                    )),
                    Some(d) if !port_listed(d) => problems.push(format!(
                        "ConfigMap {cm}: backend {address}: Service {service} has no port {port}"
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    problems
}

#[test]
fn each_embedded_lb_yaml_passes_lb_check_within_the_grace_period() {
    let scratch = tempfile::tempdir().expect("temp dir");
    for (i, file) in manifests().iter().enumerate() {
        let docs = documents(&read(file), &file.display().to_string());
        let problems = problems(&docs, &scratch.path().join(i.to_string()));
        assert!(
            problems.is_empty(),
            "{}:\n{}",
            file.display(),
            problems.join("\n")
        );
    }
}

/// The checks above fail when they should: each change to a shipped manifest is caught.
#[test]
fn the_manifest_checks_catch_what_they_are_for() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let load = |file: &str| documents(&read(&deploy().join("kubernetes").join(file)), file);
    let find = |docs: &[Value], kind_: &str, name_: &str| -> usize {
        docs.iter()
            .position(|d| kind(d) == kind_ && name(d) == name_)
            .unwrap_or_else(|| panic!("{kind_} {name_}"))
    };
    let mut case = 0;
    let mut caught = |docs: &[Value], expected: &str| {
        case += 1;
        let problems = problems(docs, &scratch.path().join(case.to_string()));
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "expected a problem with {expected:?}, found: {problems:#?}"
        );
    };

    // The grace period equal to the longest stop `lb check` prints (30s): not above it.
    let mut docs = load("lb-in-app-pod.yaml");
    let web = find(&docs, "Deployment", "web");
    docs[web]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(30);
    caught(
        &docs,
        "terminationGracePeriodSeconds 30 is not above the longest stop `lb check` prints for ConfigMap web-lb, 30s",
    );

    // A longer drain in lb.yaml makes the same grace period too short.
    let mut docs = load("lb-in-app-pod.yaml");
    let cm = find(&docs, "ConfigMap", "web-lb");
    let text = docs[cm]["data"]["lb.yaml"]
        .as_str()
        .expect("lb.yaml")
        .to_owned();
    docs[cm]["data"]["lb.yaml"] = json!(text.replace("drain_timeout: 20s", "drain_timeout: 40s"));
    caught(&docs, "terminationGracePeriodSeconds 40 is not above");

    // A typo in lb.yaml: lb check says where.
    docs[cm]["data"]["lb.yaml"] = json!(text.replace("stop_timeout:", "stop_timout:"));
    caught(&docs, "stop_timout");

    // The admin API on the pod network, without a token: lb check refuses it.
    docs[cm]["data"]["lb.yaml"] = json!(text.replace("127.0.0.1:9900", "0.0.0.0:9900"));
    caught(
        &docs,
        "admin.listen: 0.0.0.0:9900 is not a loopback address",
    );

    // An HTTP probe cannot reach a loopback admin API.
    let mut docs = load("lb-in-app-pod.yaml");
    let container = &mut docs[web]["spec"]["template"]["spec"]["containers"][0];
    container["readinessProbe"] = json!({"httpGet": {"path": "/healthz", "port": 9900}});
    caught(
        &docs,
        "readinessProbe is not `lb health --config /etc/lb/lb.yaml`",
    );

    // A fractional CPU limit: count auto rounds it down.
    let mut docs = load("lb-in-app-pod.yaml");
    let container = &mut docs[web]["spec"]["template"]["spec"]["containers"][0];
    container["resources"]["limits"]["cpu"] = json!("1500m");
    caught(&docs, "limits.cpu is not a whole number");

    // No PodDisruptionBudget.
    let mut docs = load("lb-in-app-pod.yaml");
    docs.retain(|d| kind(d) != "PodDisruptionBudget");
    caught(
        &docs,
        "Deployment web: no PodDisruptionBudget selects its pods",
    );

    // The backend's DNS name in another namespace than the headless Service's.
    let mut docs = load("lb-in-front-of-headless-service.yaml");
    let cm = find(&docs, "ConfigMap", "lb-front");
    let text = docs[cm]["data"]["lb.yaml"]
        .as_str()
        .expect("lb.yaml")
        .to_owned();
    docs[cm]["data"]["lb.yaml"] = json!(text.replace(".default.svc", ".prod.svc"));
    caught(&docs, "no Service app-headless.prod in this file");

    // The headless Service given a cluster IP.
    let mut docs = load("lb-in-front-of-headless-service.yaml");
    let headless = find(&docs, "Service", "app-headless");
    docs[headless]["spec"]["clusterIP"] = Value::Null;
    caught(&docs, "Service app-headless.default is not headless");

    // The headless Service on another port than the backend's.
    let mut docs = load("lb-in-front-of-headless-service.yaml");
    docs[headless]["spec"]["ports"][0]["port"] = json!(9090);
    caught(&docs, "Service app-headless.default has no port 8080");
}

/// Every alert rule of deploy/lb-alerts.yml.
fn alerts() -> Vec<String> {
    let file = deploy().join("lb-alerts.yml");
    let rules = documents(&read(&file), "lb-alerts.yml");
    let names: Vec<String> = rules[0]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect();
    assert!(names.len() >= 7, "alerts: {names:?}");
    names
}

fn alert_tests() -> Value {
    documents(
        &read(&deploy().join("lb-alerts.test.yml")),
        "lb-alerts.test.yml",
    )
    .remove(0)
}

/// Each `alert_rule_test` case of a promtool test file, mutable.
fn cases(tests: &mut Value) -> impl Iterator<Item = &mut Value> {
    tests["tests"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array_mut().into_iter().flatten())
}

fn fires(case: &Value) -> bool {
    case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty())
}

#[test]
fn every_alert_has_unit_tests_that_pass() {
    let mut tests = alert_tests();
    for alert in alerts() {
        let mine: Vec<&Value> = cases(&mut tests)
            .map(|c| &*c)
            .filter(|c| c["alertname"] == alert.as_str())
            .collect();
        assert!(
            mine.iter().any(|c| fires(c)),
            "{alert}: no test where it fires"
        );
        assert!(
            mine.iter().any(|c| !fires(c)),
            "{alert}: no test where it stays quiet"
        );
    }
    let (ok, output) = promtool(&["test", "rules"], &deploy().join("lb-alerts.test.yml"));
    assert!(ok, "promtool test rules:\n{output}");
    assert!(output.contains("SUCCESS"), "{output}");
}

/// The unit tests can fail: for every alert, a test expecting it quiet where it fires,
/// and one expecting it to fire where it is quiet, are each rejected by promtool.
#[test]
fn promtool_rejects_a_wrong_expectation_for_every_alert() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rules = deploy().join("lb-alerts.yml");
    for alert in alerts() {
        for flip_firing in [true, false] {
            let mut tests = alert_tests();
            tests["rule_files"] = json!([rules.display().to_string()]);
            let firing = cases(&mut tests)
                .find(|c| c["alertname"] == alert.as_str() && fires(c))
                .map(|c| c["exp_alerts"].clone())
                .expect("a firing case");
            let case = cases(&mut tests)
                .find(|c| c["alertname"] == alert.as_str() && fires(c) == flip_firing)
                .expect("a case to change");
            case["exp_alerts"] = if flip_firing { json!([]) } else { firing };
            // JSON is YAML, which promtool reads.
            let file = dir.path().join(format!("{alert}-{flip_firing}.test.json"));
            std::fs::write(&file, tests.to_string()).expect("write the test file");
            let (ok, output) = promtool(&["test", "rules"], &file);
            assert!(
                !ok,
                "{alert}: promtool passed a wrong expectation ({}):\n{output}",
                if flip_firing {
                    "quiet where it fires"
                } else {
                    "firing where it is quiet"
                }
            );
            assert!(
                output.contains(&format!("alertname: {alert}, time:")),
                "{alert}: promtool failed for another reason:\n{output}"
            );
        }
    }
}
