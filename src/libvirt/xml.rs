//! A domain's VNC endpoint, read from its live XML (libvirt's domain XML format,
//! `<devices><graphics type='vnc' ...>`).

use crate::target::Target;

/// The VNC endpoint of a domain's live XML: `<graphics type='vnc' port='5901'
/// listen='127.0.0.1'>` or `<graphics type='vnc' socket='/path'>`. A listen address of "any"
/// is reached on loopback: vncgate runs beside libvirt. An error says why there is none.
pub fn vnc_target(xml: &str) -> Result<Target, String> {
    vnc_endpoint(xml)?.ok_or_else(|| "VNC port not assigned yet".to_owned())
}

/// [`vnc_target`], with `Ok(None)` for a VNC port libvirt has not assigned yet (autoport,
/// while the domain starts): that is read again, not reported.
pub(super) fn vnc_endpoint(xml: &str) -> Result<Option<Target>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable XML: {e}"))?;
    let graphics = doc
        .descendants()
        .find(|n| n.has_tag_name("graphics") && n.attribute("type") == Some("vnc"))
        .ok_or("no VNC graphics")?;
    let socket = graphics.attribute("socket").or_else(|| {
        graphics
            .children()
            .find(|n| n.has_tag_name("listen") && n.attribute("type") == Some("socket"))
            .and_then(|n| n.attribute("socket"))
    });
    if let Some(path) = socket {
        return format!("unix:{path}")
            .parse()
            .map(Some)
            .map_err(|e| format!("VNC socket {path}: {e}"));
    }
    let Some(port) = graphics
        .attribute("port")
        .and_then(|p| p.parse::<i64>().ok())
    else {
        return Ok(None);
    };
    if port == -1 {
        return Ok(None);
    }
    if !(1..=65535).contains(&port) {
        return Err(format!("VNC port {port} out of range"));
    }
    let listen = graphics
        .children()
        .find(|n| n.has_tag_name("listen") && n.attribute("type") == Some("address"))
        .and_then(|n| n.attribute("address"))
        .or_else(|| graphics.attribute("listen"))
        .unwrap_or("127.0.0.1");
    let host = match listen {
        "0.0.0.0" | "" => "127.0.0.1".to_owned(),
        "::" => "[::1]".to_owned(),
        other if other.contains(':') && !other.starts_with('[') => format!("[{other}]"),
        other => other.to_owned(),
    };
    format!("{host}:{port}")
        .parse()
        .map(Some)
        .map_err(|e| format!("VNC endpoint {host}:{port}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(xml: &str) -> Result<String, String> {
        vnc_target(xml).map(|t| t.to_string())
    }

    #[test]
    fn vnc_endpoints_from_live_xml() {
        let tcp = "<domain><devices><graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics></devices></domain>";
        assert_eq!(text(tcp), Ok("127.0.0.1:5901".into()));
        let any = "<domain><devices><graphics type='vnc' port='5902' listen='0.0.0.0'/></devices></domain>";
        assert_eq!(text(any), Ok("127.0.0.1:5902".into()));
        let v6 = "<domain><devices><graphics type='vnc' port='5903'><listen type='address' address='::1'/></graphics></devices></domain>";
        assert_eq!(text(v6), Ok("[::1]:5903".into()));
        let unix = "<domain><devices><graphics type='vnc' socket='/run/vm.vnc'><listen type='socket' socket='/run/vm.vnc'/></graphics></devices></domain>";
        assert_eq!(text(unix), Ok("unix:/run/vm.vnc".into()));
        let spice = "<domain><devices><graphics type='spice' port='5904'/></devices></domain>";
        assert!(vnc_endpoint(spice).is_err());
        let pending =
            "<domain><devices><graphics type='vnc' port='-1' autoport='yes'/></devices></domain>";
        assert_eq!(vnc_endpoint(pending), Ok(None));
        assert!(vnc_endpoint("<not xml").is_err());
    }
}
