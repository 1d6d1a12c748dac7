//! The two Compose files stay one deployment: compose.host.yaml is compose.yaml on the host's
//! network. Compose 1.29 cannot express that as an override (see docs/docker.md), so the files
//! are separate and this test keeps them alike.

use serde_yaml::{Mapping, Value};

fn compose_file(name: &str) -> Mapping {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}")) {
        Value::Mapping(mapping) => mapping,
        other => panic!("{name} is not a mapping: {other:?}"),
    }
}

fn nbdfault_service(file: &mut Mapping) -> &mut Mapping {
    file.get_mut("services")
        .and_then(|s| s.get_mut("nbdfault"))
        .and_then(Value::as_mapping_mut)
        .expect("service nbdfault")
}

#[test]
fn compose_host_yaml_is_compose_yaml_on_the_host_network_without_published_ports() {
    let mut bridge = compose_file("compose.yaml");
    let mut host = compose_file("compose.host.yaml");

    let published = nbdfault_service(&mut bridge).remove("ports").expect("compose.yaml publishes the ports");
    assert!(
        published
            .as_sequence()
            .is_some_and(|ports| ports.iter().all(|p| p.as_str().is_some_and(|p| p.starts_with("127.0.0.1:")))),
        "compose.yaml publishes on loopback only: {published:?}"
    );
    let server = nbdfault_service(&mut host);
    assert_eq!(server.remove("network_mode"), Some(Value::from("host")));
    assert_eq!(server.get("ports"), None, "Compose 1.29 refuses ports with network_mode: host");
    let environment = server.get_mut("environment").and_then(Value::as_mapping_mut).expect("environment");
    for (variable, default) in [("NBDFAULT_LISTEN", "10809"), ("NBDFAULT_CONTROL", "10810")] {
        let value = environment.remove(variable).unwrap_or_else(|| panic!("compose.host.yaml sets {variable}"));
        let value = value.as_str().unwrap_or_default();
        assert_eq!(value, format!("${{{variable}:-127.0.0.1:{default}}}"), "{variable} listens on loopback by default");
    }
    assert_eq!(host, bridge, "beside the network, compose.host.yaml must say what compose.yaml says");
}
