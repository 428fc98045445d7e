//! Instances: requests and re-requests (by scope and title), placement
//! (pending instances placed when room appears), destruction down a tree,
//! and the partition freed once a node reports it destroyed.
//!
//! Part of the state machine: no I/O, no clock; imports only the state.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::allocation::Filter;
use super::*;

impl Master {
    /// Who a request comes from, in the terms the state keys it by.
    fn request_context(&self, spec: &RequestSpec) -> Result<RequestContext, Reply> {
        if spec.title.trim().is_empty() {
            return Err(invalid("an instance needs a non-empty title (partition_reference)"));
        }
        if spec.software_release.trim().is_empty() {
            return Err(invalid("a request needs a software release URL"));
        }
        // A market condition that cannot be read is the caller's mistake,
        // told at once, not a request left waiting for ever.
        if !spec.shared && self.effective_version() >= super::market::MARKET_VERSION {
            super::allocation::check_conditions(&spec.sla).map_err(invalid)?;
        }
        let (scope, requester, root_of_requester, owner) = match &spec.requester {
            RequestOrigin::User(user) => {
                if user.is_empty() {
                    return Err(invalid("a user request needs a user name"));
                }
                (
                    Scope::User(user.clone()),
                    Requester::User(user.clone()),
                    None,
                    user.clone(),
                )
            }
            RequestOrigin::Partition { computer, partition } => {
                let parent = &self.instances[&self.partition_instance(computer, partition)?];
                (
                    Scope::Tree(parent.root.clone()),
                    Requester::Instance(parent.id.clone()),
                    Some(parent.root.clone()),
                    parent.owner.clone(),
                )
            }
        };
        // While the root is not started, children follow its state.
        let root_state = root_of_requester
            .as_ref()
            .and_then(|r| self.instances.get(r))
            .map(|r| r.requested_state);
        Ok(RequestContext {
            scope,
            requester,
            root_of_requester,
            owner,
            root_state,
        })
    }

    /// The instance an identical re-request of `spec` answers with, when
    /// applying it would change nothing at all (no field, no state, no
    /// placement attempt, no timestamp): such a request can be answered by a
    /// linearizable read instead of a log entry. `None` when it must be
    /// applied (new, changed, or refused).
    pub fn unchanged_by(&self, spec: &RequestSpec) -> Option<&Instance> {
        let ctx = self.request_context(spec).ok()?;
        let id = self.title_id(&ctx.scope, &spec.title)?;
        let current = self.instances.get(id)?;
        let state = spec.state.map(|s| ctx.effective(s));
        (current.shared == spec.shared && RequestChanges::of(current, spec, state).none()).then_some(current)
    }

    /// What a request to destroy `spec`'s instance leaves for its caller to
    /// see, when the write itself has no instance to answer with: it was
    /// removed at once (destroyed before it was placed) or there was none
    /// (already gone, or never requested). The instance as this replica
    /// last knew it, else one built from the request, either way destroyed
    /// and on no partition. SLAP answers a destroy with the instance, never
    /// with an error the client raises: the state asked for holds.
    pub fn destroyed_view(&self, spec: &RequestSpec) -> Option<Instance> {
        let ctx = self.request_context(spec).ok()?;
        let known = self
            .title_id(&ctx.scope, &spec.title)
            .and_then(|id| self.instances.get(id));
        let mut view = match known {
            Some(inst) => Instance::clone(inst),
            None => Instance {
                id: String::new(),
                title: spec.title.clone(),
                scope: ctx.scope,
                requester: ctx.requester,
                root: ctx.root_of_requester.unwrap_or_default(),
                owner: ctx.owner,
                software_release: spec.software_release.clone(),
                software_type: spec.software_type.clone(),
                parameters: spec.parameters.clone(),
                sla: spec.sla.clone(),
                shared: spec.shared,
                requested_state: RequestedState::Destroyed,
                connection: Params::new(),
                reported: None,
                partition: None,
                host: None,
                pending_reason: None,
                timestamp: 0,
                created_at: 0,
            },
        };
        view.requested_state = RequestedState::Destroyed;
        view.partition = None;
        view.host = None;
        Some(view)
    }

    pub(super) fn request(&mut self, seq: u64, now: u64, spec: RequestSpec) -> Reply {
        let ctx = match self.request_context(&spec) {
            Ok(ctx) => ctx,
            Err(reply) => return reply,
        };
        match self.title_id(&ctx.scope, &spec.title).cloned() {
            Some(id) => {
                let state = spec.state.map(|s| ctx.effective(s));
                self.rerequest(seq, now, &id, spec, state)
            }
            None => {
                if spec.state == Some(RequestedState::Destroyed) {
                    return refused_not_found(format!("no instance titled {:?} to destroy", spec.title));
                }
                let state = ctx.effective(spec.state.unwrap_or(RequestedState::Started));
                let RequestContext {
                    scope,
                    requester,
                    root_of_requester,
                    owner,
                    ..
                } = ctx;
                let id = format!("{}-{seq}", if spec.shared { "SLAVEINST" } else { "SOFTINST" });
                let root = root_of_requester.unwrap_or_else(|| id.clone());
                let timestamp = self.tick(now);
                let instance = Instance {
                    id: id.clone(),
                    title: spec.title,
                    scope: scope.clone(),
                    requester: requester.clone(),
                    root,
                    owner,
                    software_release: spec.software_release,
                    software_type: spec.software_type,
                    parameters: spec.parameters,
                    sla: spec.sla,
                    shared: spec.shared,
                    requested_state: state,
                    connection: Params::new(),
                    reported: None,
                    partition: None,
                    host: None,
                    pending_reason: None,
                    timestamp,
                    created_at: now,
                };
                self.index_instance(&instance);
                self.instances.insert(id.clone(), Arc::new(instance));
                self.dirty.insert(Dirty::Instance(id.clone()));
                self.try_place(seq, now, &id);
                Reply::Instance(self.instances[&id].clone())
            }
        }
    }

    pub(super) fn index_instance(&mut self, inst: &Instance) {
        self.titles
            .entry(inst.scope.clone())
            .or_default()
            .insert(inst.title.clone(), inst.id.clone());
        if let Requester::Instance(parent) = &inst.requester {
            self.children.entry(parent.clone()).or_default().insert(inst.id.clone());
        }
        if let Some(host) = &inst.host {
            self.hosted.entry(host.clone()).or_default().insert(inst.id.clone());
        }
        if !inst.is_placed() {
            self.pending.insert((creation_index(&inst.id), inst.id.clone()));
        }
    }

    pub(super) fn rerequest(
        &mut self,
        seq: u64,
        now: u64,
        id: &str,
        spec: RequestSpec,
        state: Option<RequestedState>,
    ) -> Reply {
        let current = &self.instances[id];
        if current.shared != spec.shared {
            let kind = if current.shared { "a shared" } else { "a non-shared" };
            return invalid(format!("{:?} is {kind} instance; request it the same way", spec.title));
        }
        let RequestChanges {
            changed,
            sla_changed,
            placement_changed,
        } = RequestChanges::of(current, &spec, state);
        if changed || sla_changed {
            let inst = self.instance_mut(id);
            inst.software_release = spec.software_release;
            inst.software_type = spec.software_type;
            inst.parameters = spec.parameters;
            inst.sla = spec.sla;
            if let Some(s) = state {
                inst.requested_state = s;
            }
        }
        if sla_changed && !changed {
            // Only the SLA: shown in the document (`_filter_dict`), no redeploy.
            if let Some(c) = self
                .instances
                .get(id)
                .and_then(|i| i.partition.as_ref())
                .map(|(c, _)| c.clone())
            {
                self.touch_computer(seq, &c);
            }
        }
        if changed {
            self.bump(seq, now, id);
            self.bump_host_of(seq, now, id);
            if state == Some(RequestedState::Destroyed) {
                self.destroy_descendants(seq, now, id);
                self.release_if_unplaced(seq, id);
            }
        }
        if placement_changed && self.instances.get(id).is_some_and(|i| !i.is_placed()) {
            self.try_place(seq, now, id);
        }
        match self.instances.get(id) {
            Some(inst) => Reply::Instance(inst.clone()),
            // Destroyed before it was ever placed: gone at once.
            None => Reply::Done,
        }
    }

    /// A shared instance's change is a change of its host's list.
    pub(super) fn bump_host_of(&mut self, seq: u64, now: u64, id: &str) {
        if let Some(host) = self.instances.get(id).and_then(|i| i.host.clone()) {
            self.bump(seq, now, &host);
        }
    }

    /// Places a pending instance if it can be placed now; records why not otherwise.
    pub(super) fn try_place(&mut self, seq: u64, now: u64, id: &str) {
        let Some(inst) = self.instances.get(id) else { return };
        if inst.is_placed() || inst.requested_state == RequestedState::Destroyed {
            return;
        }
        let placement = Filter::parse_at(&inst.sla, inst.shared, self.effective_version()).and_then(|f| {
            if inst.shared {
                self.choose_host(&f, &inst.software_release, &inst.software_type)
                    .map(Place::Host)
            } else {
                self.choose_partition(&f, &inst.software_release, &inst.root, seq)
                    .map(Place::Partition)
            }
        });
        let key = (creation_index(id), id.to_string());
        match placement {
            Err(reason) => {
                let inst = self.instance_mut(id);
                inst.pending_reason = Some(reason);
                self.pending.insert(key);
            }
            Ok(place) => {
                self.pending.remove(&key);
                let inst = self.instance_mut(id);
                inst.pending_reason = None;
                match place {
                    Place::Partition((c, p)) => {
                        inst.partition = Some((c.clone(), p.clone()));
                        let part = self
                            .partitions
                            .get_mut(&(c.clone(), p.clone()))
                            .expect("chosen partition exists");
                        part.state = SlapState::Busy;
                        part.instance = Some(id.to_string());
                        let capabilities = part.capabilities.clone();
                        if let Some(position) = self.position_of(&c, &p) {
                            self.placement.occupy(&c, position, &capabilities);
                        }
                        self.recheck_certified(&c, &p);
                        self.dirty.insert(Dirty::Partition(c.clone(), p));
                        self.agree(now, id, &c);
                        self.bump(seq, now, id);
                        // A new instance may be the host waiting shared ones need.
                        self.place_pending_shared(seq, now);
                    }
                    Place::Host(host) => {
                        inst.host = Some(host.clone());
                        self.hosted.entry(host.clone()).or_default().insert(id.to_string());
                        self.bump(seq, now, id);
                        self.bump(seq, now, &host);
                    }
                }
            }
        }
    }

    /// Retries the pending shared instances, oldest first.
    pub(super) fn place_pending_shared(&mut self, seq: u64, now: u64) {
        let waiting: Vec<InstanceId> = self
            .pending
            .iter()
            .filter(|(_, id)| self.instances.get(id).is_some_and(|i| i.shared))
            .map(|(_, id)| id.clone())
            .collect();
        for id in waiting {
            self.try_place(seq, now, &id);
        }
    }

    /// Retries every pending instance, oldest first.
    pub(super) fn place_pending(&mut self, seq: u64, now: u64) {
        let waiting: Vec<InstanceId> = self.pending.iter().map(|(_, id)| id.clone()).collect();
        for id in waiting {
            self.try_place(seq, now, &id);
        }
    }

    /// Marks every descendant of `id` destroyed (and removes those never placed).
    pub(super) fn destroy_descendants(&mut self, seq: u64, now: u64, id: &str) {
        let mut stack: Vec<InstanceId> = self.children.get(id).into_iter().flatten().cloned().collect();
        while let Some(child) = stack.pop() {
            stack.extend(self.children.get(&child).into_iter().flatten().cloned());
            if self
                .instances
                .get(&child)
                .is_some_and(|c| c.requested_state != RequestedState::Destroyed)
            {
                self.instance_mut(&child).requested_state = RequestedState::Destroyed;
                self.bump(seq, now, &child);
                self.bump_host_of(seq, now, &child);
            }
            self.release_if_unplaced(seq, &child);
        }
    }

    /// A destroyed instance that holds no partition (never placed, or
    /// shared) has nothing for a node to wipe: it goes at once.
    pub(super) fn release_if_unplaced(&mut self, seq: u64, id: &str) {
        let Some(inst) = self.instances.get(id) else { return };
        if inst.requested_state != RequestedState::Destroyed || inst.partition.is_some() {
            return;
        }
        if self.children.get(id).is_some_and(|c| !c.is_empty()) {
            return;
        }
        self.remove_instance(seq, id);
    }

    /// Forgets an instance entirely, freeing its partition and detaching what
    /// it hosted (those shared instances wait for a new host).
    pub(super) fn remove_instance(&mut self, seq: u64, id: &str) {
        let Some(inst) = self.instances.remove(id) else { return };
        self.dirty.insert(Dirty::Instance(id.to_string()));
        if let Some(titles) = self.titles.get_mut(&inst.scope) {
            titles.remove(&inst.title);
            if titles.is_empty() {
                self.titles.remove(&inst.scope);
            }
        }
        self.pending.remove(&(creation_index(id), id.to_string()));
        if let Requester::Instance(parent) = &inst.requester {
            if let Some(set) = self.children.get_mut(parent) {
                set.remove(id);
                if set.is_empty() {
                    self.children.remove(parent);
                }
            }
        }
        if let Some(host) = &inst.host {
            if let Some(set) = self.hosted.get_mut(host) {
                set.remove(id);
                if set.is_empty() {
                    self.hosted.remove(host);
                }
            }
            if let Some(h) = self.instances.get(host).and_then(|h| h.partition.clone()) {
                self.touch_computer(seq, &h.0);
            }
        }
        if let Some((c, p)) = &inst.partition {
            if let Some(part) = self.partitions.get_mut(&(c.clone(), p.clone())) {
                part.state = SlapState::Free;
                part.instance = None;
                let capabilities = part.capabilities.clone();
                if let Some(position) = self.position_of(c, p) {
                    self.placement.vacate(c, position, &capabilities);
                }
                self.dirty.insert(Dirty::Partition(c.clone(), p.clone()));
            }
            self.revoke_partition_certificates(c, p);
            self.touch_computer(seq, c);
        }
        for guest in self.hosted.remove(id).unwrap_or_default() {
            if let Some(g) = self.instances.get_mut(&guest).map(Arc::make_mut) {
                g.host = None;
                g.pending_reason = Some(format!("its host {id} was destroyed"));
                self.dirty.insert(Dirty::Instance(guest.clone()));
                self.pending.insert((creation_index(&guest), guest.clone()));
            }
        }
        // A destroyed parent that was waiting only for this child may go now.
        if let Requester::Instance(parent) = &inst.requester {
            self.release_if_unplaced(seq, parent);
        }
    }

    pub(super) fn destroyed_partition(&mut self, seq: u64, now: u64, computer: &str, partition: &str) -> Reply {
        let key = (computer.to_string(), partition.to_string());
        let Some(part) = self.partitions.get(&key) else {
            return refused_not_found(format!("computer {computer} has no partition {partition}"));
        };
        let Some(id) = part.instance.clone() else {
            // Already free: a node repeating itself after a lost answer.
            return Reply::Done;
        };
        let inst = &self.instances[&id];
        if inst.requested_state != RequestedState::Destroyed {
            return Reply::Note(format!(
                "instance {id} on {partition} is not requested destroyed; nothing freed"
            ));
        }
        let live: Vec<String> = self.children_of(&id).map(|c| c.title.clone()).collect();
        if !live.is_empty() {
            self.destroy_descendants(seq, now, &id);
            return Reply::Note(format!(
                "Not destroying yet because this partition has child partitions: {}",
                live.join(", ")
            ));
        }
        self.close_hosting(seq, &id, now);
        self.remove_instance(seq, &id);
        // The freed partition and any detached shared instances may place waiting ones.
        self.place_pending(seq, now);
        // A parent waiting for this child to go may now be freed by its node.
        Reply::Done
    }

    pub(super) fn set_related(
        &mut self,
        seq: u64,
        now: u64,
        computer: &str,
        partition: &str,
        titles: &[String],
    ) -> Reply {
        let id = match self.partition_instance(computer, partition) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        let keep: BTreeSet<&str> = titles.iter().map(String::as_str).collect();
        let unlinked: Vec<InstanceId> = self
            .children_of(&id)
            .filter(|c| !keep.contains(c.title.as_str()) && c.requested_state != RequestedState::Destroyed)
            .map(|c| c.id.clone())
            .collect();
        for child in unlinked {
            self.instance_mut(&child).requested_state = RequestedState::Destroyed;
            self.bump(seq, now, &child);
            self.bump_host_of(seq, now, &child);
            self.destroy_descendants(seq, now, &child);
            self.release_if_unplaced(seq, &child);
        }
        Reply::Done
    }
}

enum Place {
    Partition((ComputerId, PartitionId)),
    Host(InstanceId),
}

/// A request's origin resolved against the state: the scope its title lives
/// in, who asks, and the state of the tree it belongs to.
struct RequestContext {
    scope: Scope,
    requester: Requester,
    root_of_requester: Option<InstanceId>,
    owner: String,
    root_state: Option<RequestedState>,
}

impl RequestContext {
    /// The state an instance of this tree gets when `wanted` is asked: while
    /// the root is not started, children follow its state.
    fn effective(&self, wanted: RequestedState) -> RequestedState {
        match self.root_state {
            Some(rs) if rs != RequestedState::Started && wanted < rs => rs,
            _ => wanted,
        }
    }
}

/// What a re-request changes in an existing instance.
struct RequestChanges {
    /// Release, type, parameters or requested state: a redeploy (timestamp bump).
    changed: bool,
    /// The SLA (shown in the document, no redeploy).
    sla_changed: bool,
    /// What placement depends on. Capacity events (a computer, a supply, a
    /// freed partition, a new host) already retry every pending instance,
    /// so a re-request that changes none of these has nothing to retry.
    placement_changed: bool,
}

impl RequestChanges {
    fn of(current: &Instance, spec: &RequestSpec, state: Option<RequestedState>) -> RequestChanges {
        let changed = current.software_release != spec.software_release
            || current.software_type != spec.software_type
            || current.parameters != spec.parameters
            || state.is_some_and(|s| s != current.requested_state);
        let sla_changed = current.sla != spec.sla;
        RequestChanges {
            changed,
            sla_changed,
            placement_changed: sla_changed
                || current.software_release != spec.software_release
                || current.software_type != spec.software_type,
        }
    }

    fn none(&self) -> bool {
        !self.changed && !self.sla_changed && !self.placement_changed
    }
}
