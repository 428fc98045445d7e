//! `master-node user|gateway|computer|cert`: certificates the cluster
//! issues (users, administrators, gateways), one-time registration tokens
//! for computers, and listing and revoking certificates.

use std::path::Path;

use crate::cli::Admin;
use crate::commands::Fail;

/// `user add`: a user's (or administrator's) certificate, its key and the CA, into `out`.
pub async fn add_user(admin: &Admin, name: &str, out: &Path, admin_role: bool, days: u64) -> Result<(), Fail> {
    let action = if admin_role { "admin" } else { "user" };
    let reply = certificates(admin, action, name, "", days, vec![]).await?;
    std::fs::create_dir_all(out).map_err(|e| Fail(format!("{}: {e}", out.display())))?;
    let write = |file: String, content: &str, private: bool| -> Result<(), Fail> {
        let path = out.join(&file);
        let res = if private {
            master_node::pki::write_private(&path, content)
        } else {
            std::fs::write(&path, content)
        };
        res.map_err(|e| Fail(format!("writing {}: {e}", path.display())))
    };
    write(format!("{name}.crt"), &reply.certificate_pem, false)?;
    write(format!("{name}.key"), &reply.key_pem, true)?;
    write("ca.crt".into(), &reply.ca_pem, false)?;
    println!(
        "{} certificate for {name} written to {}/{name}.crt and {name}.key (mode 0600); the CA is in ca.crt",
        if admin_role { "administrator" } else { "user" },
        out.display()
    );
    Ok(())
}

/// `gateway add`: a slap-gateway's certificate for `hosts`, its key and the CA, into `out`.
pub async fn add_gateway(admin: &Admin, name: &str, hosts: Vec<String>, out: &Path) -> Result<(), Fail> {
    let reply = certificates(admin, "gateway", name, "", 0, hosts).await?;
    std::fs::create_dir_all(out).map_err(|e| Fail(format!("{}: {e}", out.display())))?;
    let fail = |e: std::io::Error| Fail(format!("writing into {}: {e}", out.display()));
    master_node::pki::write_private(&out.join("gateway.key"), &reply.key_pem).map_err(fail)?;
    std::fs::write(out.join("gateway.crt"), &reply.certificate_pem).map_err(fail)?;
    std::fs::write(out.join("ca.crt"), &reply.ca_pem).map_err(fail)?;
    println!(
        "gateway {name}: {}/gateway.crt, gateway.key (mode 0600), ca.crt; run slap-gateway --tls-dir {}",
        out.display(),
        out.display()
    );
    Ok(())
}

/// `computer add`: a one-time token for `nodeagent register`.
pub async fn add_computer(admin: &Admin, id: &str) -> Result<(), Fail> {
    let reply = certificates(admin, "computer-token", id, "", 0, vec![]).await?;
    println!("{}", reply.registration);
    eprintln!(
        "on the node: nodeagent register --master {} --computer-id {id} --token {}",
        admin.peer, reply.registration
    );
    Ok(())
}

/// `cert list`: serial, expiry, state and role of every certificate issued.
pub async fn list_certificates(admin: &Admin) -> Result<(), Fail> {
    let reply = certificates(admin, "list", "", "", 0, vec![]).await?;
    println!("{:<34} {:<12} {:<8} role", "serial", "expires", "state");
    for c in reply.certificates {
        let left = c.not_after as i64 - master_node::pki::now_secs() as i64;
        let days = left.div_euclid(86400);
        let state = if c.revoked {
            "revoked"
        } else if left < 0 {
            "expired"
        } else {
            "valid"
        };
        println!(
            "{:<34} {:<12} {:<8} {}",
            c.serial,
            format!("in {days} d"),
            state,
            c.role
        );
    }
    Ok(())
}

/// `cert revoke`: every replica refuses the certificate from its next handshake on.
pub async fn revoke(admin: &Admin, serial: &str) -> Result<(), Fail> {
    certificates(admin, "revoke", "", serial, 0, vec![]).await?;
    println!("certificate {serial} revoked");
    Ok(())
}

/// `cert renew`: the new certificate, key and CA into `out`, named as the
/// holder names its own (so a holder watching `out` takes them at once).
pub async fn renew(admin: &Admin, serial: &str, out: &Path, days: u64, seconds: u64) -> Result<(), Fail> {
    let reply = certificates_for(admin, "renew", "", serial, days, seconds, vec![]).await?;
    let der = slap_proto::tls::ca_certificates(&reply.certificate_pem)?.remove(0);
    let stem = match master_node::pki::role_of(der.as_ref()) {
        Some(master_node::state::Role::Computer(_)) => "computer".to_string(),
        Some(master_node::state::Role::Gateway(_)) => "gateway".to_string(),
        Some(master_node::state::Role::Replica(_)) => "replica".to_string(),
        Some(master_node::state::Role::Admin) => "admin".to_string(),
        Some(master_node::state::Role::User(u)) => u,
        _ => "cert".to_string(),
    };
    std::fs::create_dir_all(out).map_err(|e| Fail(format!("{}: {e}", out.display())))?;
    let fail = |e: std::io::Error| Fail(format!("writing into {}: {e}", out.display()));
    let (crt, key) = (out.join(format!("{stem}.crt")), out.join(format!("{stem}.key")));
    master_node::pki::write_public(&out.join("ca.crt"), &reply.ca_pem).map_err(fail)?;
    slap_proto::live::install(&crt, &reply.certificate_pem, &key, &reply.key_pem).map_err(fail)?;
    let serial_new = slap_proto::live::Validity::of_pem(&reply.certificate_pem)
        .map(|v| v.serial)
        .unwrap_or_default();
    println!(
        "certificate {serial} renewed: the new one, {serial_new}, is {} with {stem}.key (mode 0600); \
         the old one stays valid until it expires",
        crt.display()
    );
    Ok(())
}

/// `ca rotate`: starts the rotation, and prints the join token for the new CA.
pub async fn rotate_ca(admin: &Admin) -> Result<(), Fail> {
    let reply = certificates(admin, "ca-rotate", "", "", 0, vec![]).await?;
    let pin = slap_proto::tls::pem_sha256(&reply.ca_pem)?;
    println!(
        "CA rotation started: a new CA (sha256 {pin}) signs from now on; the old one stays trusted until `ca finish`"
    );
    let mut token = master_node::identity::JoinToken::parse(&admin.token)?;
    token.ca_sha256 = pin;
    // The replica sends the new CA from its next second on: answer once
    // the new token reaches it, so the token printed works at once.
    let credentials = master_node::client::Credentials::token(&token)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while master_node::client::Client::status_of(&admin.peer, &credentials)
        .await
        .is_err()
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    println!("join token for the new CA (the old one works until `ca finish`; each replica's join-token file gets it too): {token}");
    println!(
        "next: renew node and user certificates into their holders' directories (`cert renew SERIAL --out DIR`); \
         replicas and gateways renew their own; then `ca finish`"
    );
    Ok(())
}

/// `ca finish`: ends the rotation.
pub async fn finish_ca_rotation(admin: &Admin, force: bool) -> Result<(), Fail> {
    let client = admin.client()?;
    let req = slap_proto::cluster::CertificatesRequest {
        token: admin.token.clone(),
        action: "ca-finish".into(),
        force,
        ..Default::default()
    };
    client
        .call(|mut c| {
            let req = req.clone();
            async move { c.certificates(req).await }
        })
        .await?;
    println!("CA rotation finished: only the new CA is trusted from now on");
    Ok(())
}

async fn certificates(
    admin: &Admin,
    action: &str,
    name: &str,
    serial: &str,
    days: u64,
    hosts: Vec<String>,
) -> Result<slap_proto::cluster::CertificatesReply, Fail> {
    certificates_for(admin, action, name, serial, days, 0, hosts).await
}

async fn certificates_for(
    admin: &Admin,
    action: &str,
    name: &str,
    serial: &str,
    days: u64,
    seconds: u64,
    hosts: Vec<String>,
) -> Result<slap_proto::cluster::CertificatesReply, Fail> {
    let client = admin.client()?;
    let req = slap_proto::cluster::CertificatesRequest {
        token: admin.token.clone(),
        action: action.into(),
        name: name.into(),
        serial: serial.into(),
        registration: String::new(),
        days,
        hosts,
        seconds,
        force: false,
    };
    Ok(client
        .call(|mut c| {
            let req = req.clone();
            async move { c.certificates(req).await }
        })
        .await?
        .into_inner())
}
