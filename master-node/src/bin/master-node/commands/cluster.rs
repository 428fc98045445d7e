//! `master-node init|join|run|leave|status`: creating a cluster, joining
//! one, restarting a replica, removing one, and the cluster's view.

use std::path::Path;

use master_node::client::{Client, Credentials};
use master_node::identity::{Identity, JoinToken};
use master_node::server::{Running, Stopped};
use slap_proto::cluster::{JoinRequest, LeaveRequest, PromoteRequest};

use crate::cli::{InitArgs, JoinArgs, LeaveArgs, RunArgs, Serving, StatusArgs};
use crate::commands::Fail;

/// Starts serving clients as the flags say: SLAP (announced to the cluster
/// under its public address) and monitoring.
pub(crate) async fn start_serving(running: &mut Running, serving: &Serving) -> Result<(), Fail> {
    running.limit_rate(serving.rate_limit, serving.rate_burst);
    if let Some(addr) = &serving.slap_listen {
        running
            .serve_slap_advertised(addr, serving.slap_advertise.as_deref(), serving.insecure_http)
            .await?;
        running.announce(serving.slap_advertise.as_deref().unwrap_or(addr));
    }
    if let Some(addr) = &serving.http_listen {
        running.serve_monitoring(addr).await?;
    }
    Ok(())
}

/// Refuses a data dir that already holds something.
pub(crate) fn check_empty(data_dir: &Path) -> Result<(), Fail> {
    if let Some(id) = Identity::load(data_dir)? {
        return Err(Fail(format!(
            "{} already holds replica {} of cluster {}; restart it with `master-node run --data-dir {}`",
            data_dir.display(),
            id.node_id,
            id.cluster_id,
            data_dir.display()
        )));
    }
    if data_dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(Fail(format!(
            "{} is not empty; give an empty or new directory",
            data_dir.display()
        )));
    }
    Ok(())
}

pub async fn init(InitArgs { replica: a }: InitArgs) -> Result<(), Fail> {
    check_empty(&a.data_dir)?;
    let advertise = a.advertise();
    let founding = master_node::founding::Founding::new(&[&a.listen, &advertise])?;
    let token = founding.token.clone();
    let identity = Identity {
        format: 1,
        cluster_id: token.cluster_id.clone(),
        node_id: 1,
        listen: a.listen.clone(),
        advertise: advertise.clone(),
        left: false,
    };
    std::fs::create_dir_all(&a.data_dir).map_err(|e| Fail(format!("{}: {e}", a.data_dir.display())))?;
    founding.replica_tls.save(&a.data_dir)?;
    let mut running = Running::start(&a.data_dir, &identity, &a.serving.timing, true).await?;
    start_serving(&mut running, &a.serving).await?;
    running.found_cluster(&advertise, &founding).await.map_err(Fail)?;
    let admin_dir = a.data_dir.join("admin");
    founding
        .save_admin(&admin_dir)
        .map_err(|e| Fail(format!("writing {}: {e}", admin_dir.display())))?;
    identity.save(&a.data_dir)?;
    token.save(&a.data_dir)?;
    tracing::info!(cluster = %token.cluster_id, listen = %a.listen, "cluster created; replica 1 is its first member");
    println!("{token}");
    eprintln!(
        "master-node: cluster {} created. Join more replicas with:\n  master-node join --peer {advertise} --token {token} --data-dir DIR --listen ADDR\n(the token is also in {}; an administrator's certificate is in {})",
        token.cluster_id,
        a.data_dir.join("join-token").display(),
        admin_dir.display()
    );
    serve(running).await
}

pub async fn join(
    JoinArgs {
        peer,
        token: token_text,
        replica: a,
    }: JoinArgs,
) -> Result<(), Fail> {
    let token = JoinToken::parse(&token_text)?;
    if let Some(id) = Identity::load(&a.data_dir)? {
        return Err(Fail(if id.cluster_id == token.cluster_id {
            format!(
                "{} already holds replica {} of this cluster; restart it with `master-node run`",
                a.data_dir.display(),
                id.node_id
            )
        } else {
            format!(
                "{} belongs to cluster {}, not {}; give an empty data dir",
                a.data_dir.display(),
                id.cluster_id,
                token.cluster_id
            )
        }));
    }
    check_empty(&a.data_dir)?;
    let advertise = a.advertise();
    // The peer must show the CA the token pins; the joiner's key stays here.
    let client = Client::new(std::slice::from_ref(&peer), &Credentials::token(&token)?)?;
    let (csr_pem, key_pem) = master_node::pki::signing_request()?;
    let hosts = master_node::founding::server_names(&[&a.listen, &advertise]);
    let reply = client
        .call(|mut c| {
            let req = JoinRequest {
                token: token_text.clone(),
                addr: advertise.clone(),
                csr_pem: csr_pem.clone(),
                hosts: hosts.clone(),
                speaks_version: master_node::raft::spoken_version(),
            };
            async move { c.join(req).await }
        })
        .await?
        .into_inner();
    if reply.cluster_id != token.cluster_id {
        return Err(Fail(format!(
            "{} answered for cluster {}, but the token is for cluster {}",
            peer, reply.cluster_id, token.cluster_id
        )));
    }
    // During a CA rotation the cluster trusts two CAs; the token may pin either.
    let pinned = slap_proto::tls::ca_certificates(&reply.ca_pem)?.iter().any(|ca| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(ca.as_ref())) == token.ca_sha256
    });
    if !pinned {
        return Err(Fail(format!(
            "{peer} sent a CA that is not the one the token pins; not joining"
        )));
    }
    std::fs::create_dir_all(&a.data_dir).map_err(|e| Fail(format!("{}: {e}", a.data_dir.display())))?;
    master_node::cluster_tls::ReplicaTls::new(reply.ca_pem.clone(), &reply.certificate_pem, &key_pem)?
        .save(&a.data_dir)?;
    let identity = Identity {
        format: 1,
        cluster_id: reply.cluster_id.clone(),
        node_id: reply.node_id,
        listen: a.listen.clone(),
        advertise: advertise.clone(),
        left: false,
    };
    let mut running = Running::start(&a.data_dir, &identity, &a.serving.timing, true).await?;
    start_serving(&mut running, &a.serving).await?;
    identity.save(&a.data_dir)?;
    token.save(&a.data_dir)?;
    tracing::info!(replica = reply.node_id, "reserved replica id; catching up as a learner");
    let members = client
        .call(|mut c| {
            let req = PromoteRequest {
                token: token_text.clone(),
                node_id: reply.node_id,
                addr: advertise.clone(),
            };
            async move { c.promote(req).await }
        })
        .await;
    match members {
        Ok(m) => {
            running.replica.mark_joined();
            let ids: Vec<u64> = m.into_inner().members.iter().map(|m| m.id).collect();
            tracing::info!(replica = reply.node_id, members = ?ids, "joined as a voter");
            println!("joined cluster {} as replica {}", reply.cluster_id, reply.node_id);
        }
        Err(e) => {
            running.shutdown().await;
            return Err(Fail(format!(
                "replica {} could not be promoted: {e}. Remove the reserved id with `master-node leave --id {} ...` if it was added, then join again with an empty data dir",
                reply.node_id, reply.node_id
            )));
        }
    }
    serve(running).await
}

pub async fn restart(a: RunArgs) -> Result<(), Fail> {
    let identity = Identity::load(&a.data_dir)?.ok_or_else(|| {
        Fail(format!(
            "{} holds no replica; create one with `master-node init` or `master-node join`",
            a.data_dir.display()
        ))
    })?;
    if identity.left {
        return Err(Fail(format!(
            "replica {} left cluster {}; it cannot run again. Join with an empty data dir to add a new replica",
            identity.node_id, identity.cluster_id
        )));
    }
    let mut running = Running::start(&a.data_dir, &identity, &a.serving.timing, false).await?;
    start_serving(&mut running, &a.serving).await?;
    serve(running).await
}

/// Serves until SIGINT/SIGTERM or until the replica stops by itself.
pub(crate) async fn serve(running: Running) -> Result<(), Fail> {
    let mut stopped = running.stopped.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        r = stopped.wait_for(|s| s.is_some()) => match r.ok().and_then(|s| s.clone()) {
            Some(Stopped::Failed(reason)) => Err(Fail(reason)),
            // Removed from the cluster: a normal end.
            _ => Ok(()),
        }
    };
    tracing::info!("stopping");
    running.shutdown().await;
    outcome
}

pub async fn leave(a: LeaveArgs) -> Result<(), Fail> {
    let (id, peer, token) = match (&a.data_dir, a.id) {
        (Some(dir), _) => {
            let identity = Identity::load(dir)?.ok_or_else(|| Fail(format!("{} holds no replica", dir.display())))?;
            let token = match &a.token {
                Some(t) => t.clone(),
                None => JoinToken::load(dir)?.to_string(),
            };
            (identity.node_id, a.peer.clone().unwrap_or(identity.advertise), token)
        }
        (None, Some(id)) => (
            id,
            a.peer.clone().unwrap_or_default(),
            a.token.clone().unwrap_or_default(),
        ),
        (None, None) => {
            return Err(Fail(
                "say which replica leaves: --data-dir D, or --id N --peer ADDR --token T".into(),
            ))
        }
    };
    let credentials = Credentials::token(&JoinToken::parse(&token)?)?;
    let client = Client::new(&[peer], &credentials)?;
    let reply = client
        .call(|mut c| {
            let req = LeaveRequest {
                token: token.clone(),
                node_id: id,
            };
            async move { c.leave(req).await }
        })
        .await?
        .into_inner();
    let rest: Vec<String> = reply.members.iter().map(|m| format!("{} ({})", m.id, m.role)).collect();
    println!("replica {id} removed; members now: {}", rest.join(", "));
    Ok(())
}

pub async fn status(a: StatusArgs) -> Result<(), Fail> {
    let credentials = a.trust.credentials()?;
    let mut st = Client::status_of(&a.peer, &credentials).await?;
    // Lag is only known to the leader: ask it when the peer is not the leader.
    if !st.leader_view && !st.leader_addr.is_empty() && st.leader_addr != a.peer {
        if let Ok(leader) = Client::status_of(&st.leader_addr, &credentials).await {
            st.members = leader.members;
            st.leader_view = leader.leader_view;
        }
    }
    if a.json {
        let members: Vec<serde_json::Value> = st
            .members
            .iter()
            .map(
                |m| serde_json::json!({"id": m.id, "addr": m.addr, "role": m.role, "matched": m.matched, "lag": m.lag}),
            )
            .collect();
        let expiring: Vec<serde_json::Value> = st
            .expiring
            .iter()
            .map(|e| serde_json::json!({"kind": e.kind, "count": e.count, "earliest_not_after": e.earliest_not_after}))
            .collect();
        let doc = serde_json::json!({
            "cluster_id": st.cluster_id, "replica": st.node_id, "state": st.state, "term": st.term,
            "leader_id": st.leader_id, "leader_addr": st.leader_addr, "last_log_index": st.last_log_index,
            "committed": st.committed, "applied": st.applied, "members": members,
            "certificates_expiring_within_30_days": expiring,
            "ca_rotation": st.ca_rotation,
            "speaks_version": st.speaks_version.max(1), "cluster_version": st.cluster_version.max(1),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "cluster {}  (asked replica {} at {})",
        st.cluster_id, st.node_id, a.peer
    );
    println!(
        "replica {}: {}, term {}, last log {}, committed {}, applied {}",
        st.node_id, st.state, st.term, st.last_log_index, st.committed, st.applied
    );
    println!(
        "version: the cluster is at {}; replica {} speaks up to {}",
        st.cluster_version.max(1),
        st.node_id,
        st.speaks_version.max(1)
    );
    match st.leader_id {
        Some(l) => println!("leader: replica {l} at {}", st.leader_addr),
        None => println!("leader: none known (election in progress, or no quorum)"),
    }
    println!(
        "{:>4}  {:<24} {:<8} {:>10} {:>8}",
        "id", "address", "role", "matched", "lag"
    );
    for m in &st.members {
        let fmt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:>4}  {:<24} {:<8} {:>10} {:>8}",
            m.id,
            m.addr,
            m.role,
            fmt(m.matched),
            fmt(m.lag)
        );
    }
    if st.ca_rotation {
        println!(
            "warning: a CA rotation is under way: both CAs are trusted; renew nodes' and users' certificates, then `master-node ca finish`"
        );
    }
    let now = master_node::pki::now_secs();
    for e in &st.expiring {
        let plural = if e.count == 1 { "" } else { "s" };
        let first = match e.earliest_not_after.checked_sub(now) {
            None | Some(0) => "one has already ended".to_string(),
            Some(left) => format!("the first in {} days", left.div_ceil(86_400)),
        };
        println!(
            "warning: {} {} certificate{plural} end within {} days ({first}): renew them; `master-node cert list` names them",
            e.count,
            e.kind,
            master_node::replica::EXPIRY_WARNING_DAYS
        );
    }
    Ok(())
}
