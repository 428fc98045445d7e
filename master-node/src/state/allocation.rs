//! Where an instance goes: the SLA filter (reference §3.4, and the market's
//! conditions, see [`super::market`]) and the choice of a partition among
//! those that match.
//!
//! The choice is deterministic, because every replica makes it inside
//! `apply`: it depends only on the state and the proposal's sequence
//! number. It takes the cheapest computer (its offer's hourly price, else
//! the catalog's; free before any price); among equally priced ones, it
//! prefers the one with the fewest busy partitions; among equally loaded
//! ones it takes the first at or after a point that the sequence number
//! picks on a fixed hash of computer ids, so equal computers (and their
//! providers) fill evenly instead of the first one filling up.
//!
//! A cloud has thousands of computers, so the choice does not scan them: the
//! [`PlacementIndex`] keeps, per software release, the computers that have
//! it supplied and a partition to sell, ordered by price, then load. An
//! unconstrained request, or one naming its computer, takes the first entry
//! that fits; a request with other SLA keys walks the entries in that order
//! until one matches, and stops at the first price above its `max_price`.
//!
//! Part of the state machine: imports only the state.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use super::market::{Conditions, Terms, CONDITION_KEYS, MARKET_VERSION};
use super::model::*;
use super::Master;

/// SLA keys that restrict the computer through its categories.
pub const CATEGORY_KEYS: &[&str] = &[
    "group",
    "cpu_core",
    "cpu_frequency",
    "cpu_type",
    "local_area_network_type",
    "region",
    "memory_size",
    "memory_type",
    "storage_capacity",
    "storage_interface",
    "storage_redundancy",
];

/// SLA keys passed through to the node, with no effect on placement.
pub const PASSTHROUGH_KEYS: &[&str] = &[
    "retention_delay",
    "fw_restricted_access",
    "fw_authorized_sources",
    "fw_rejected_sources",
];

/// An SLA read and checked.
#[derive(Debug, Default, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Filter {
    pub computer_guid: Option<String>,
    pub instance_guid: Option<String>,
    pub network_guid: Option<String>,
    pub project_guid: Option<String>,
    pub unique_by_network: bool,
    pub capability: Option<String>,
    pub categories: Vec<(String, String)>,
    /// The market's conditions (price, CPU, memory, provider).
    pub conditions: Conditions,
}

impl Filter {
    /// Reads an SLA. An unknown key (or a key that does not apply to this
    /// kind of instance) makes placement impossible, as in SlapOS; the error
    /// says which key.
    pub fn parse(sla: &Params, shared: bool) -> Result<Filter, String> {
        Self::parse_at(sla, shared, super::command::VERSION)
    }

    /// [`Filter::parse`] as a cluster at command set `version` reads an SLA:
    /// before the market's version, its keys are unknown, as they were, so
    /// every replica of a cluster being upgraded places alike.
    pub fn parse_at(sla: &Params, shared: bool, version: u32) -> Result<Filter, String> {
        let market = version >= MARKET_VERSION;
        let mut f = Filter::default();
        for (key, value) in sla {
            match key.as_str() {
                "computer_guid" => f.computer_guid = Some(value.clone()),
                "instance_guid" if shared => f.instance_guid = Some(value.clone()),
                "instance_guid" => {
                    return Err(
                        "SLA key instance_guid only applies to shared instances; placement is impossible".into(),
                    )
                }
                "network_guid" => f.network_guid = Some(value.clone()),
                "project_guid" => f.project_guid = Some(value.clone()),
                "mode" if value == "unique_by_network" => f.unique_by_network = true,
                "mode" => {
                    return Err(format!(
                        "SLA mode {value:?} is unknown (only unique_by_network is); placement is impossible"
                    ))
                }
                "capability" => f.capability = Some(value.clone()),
                k if CONDITION_KEYS.contains(&k) && market && !shared => f.conditions.read(k, value)?,
                k if CONDITION_KEYS.contains(&k) && market => {
                    return Err(format!(
                        "SLA key {k} is a market condition for a partition; a shared instance has none; \
                         placement is impossible"
                    ))
                }
                k if CATEGORY_KEYS.contains(&k) => f.categories.push((key.clone(), value.clone())),
                k if PASSTHROUGH_KEYS.contains(&k) => {}
                _ => return Err(format!("SLA key {key:?} is unknown; placement is impossible")),
            }
        }
        Ok(f)
    }

    /// Whether `computer` satisfies the computer-level keys.
    pub fn accepts_computer(&self, computer: &Computer) -> bool {
        self.accepts_in_region(computer, computer.categories.get("region").map(String::as_str))
    }

    /// [`Filter::accepts_computer`] on the market's terms: the region is
    /// the offer's where it states one; and the conditions hold.
    pub fn accepts_terms(&self, computer: &Computer, terms: &Terms) -> bool {
        self.accepts_in_region(computer, terms.region) && self.conditions.accepts(terms)
    }

    /// The computer-level keys, `region` read as `region`.
    fn accepts_in_region(&self, computer: &Computer, region: Option<&str>) -> bool {
        let cat = |k: &str| computer.categories.get(k);
        self.computer_guid.as_ref().is_none_or(|g| *g == computer.id)
            && self
                .network_guid
                .as_ref()
                .is_none_or(|g| cat("network_guid") == Some(g))
            && self
                .project_guid
                .as_ref()
                .is_none_or(|g| cat("project_guid") == Some(g))
            && self.categories.iter().all(|(k, v)| match k.as_str() {
                "region" => region == Some(v.as_str()),
                _ => cat(k) == Some(v),
            })
    }

    /// Whether `partition` satisfies the capability rule: a requested
    /// capability must be declared; partitions declaring capabilities take
    /// only instances that ask for one of them.
    pub fn accepts_partition(&self, partition: &Partition) -> bool {
        self.accepts_capabilities(&partition.capabilities)
    }

    /// [`Filter::accepts_partition`] for a partition declaring `capabilities`.
    pub fn accepts_capabilities(&self, capabilities: &[String]) -> bool {
        self.accepts_offered_capabilities(capabilities, &[])
    }

    /// [`Filter::accepts_capabilities`] on a computer whose offer gives
    /// every partition it sells `offered` (a partition declaring none
    /// takes a request for one of those).
    pub fn accepts_offered_capabilities(&self, capabilities: &[String], offered: &[String]) -> bool {
        match &self.capability {
            Some(c) => capabilities.contains(c) || (capabilities.is_empty() && offered.contains(c)),
            None => capabilities.is_empty(),
        }
    }
}

/// Checks the market conditions of an SLA (see [`Conditions::read`]).
pub fn check_conditions(sla: &Params) -> Result<(), String> {
    let mut conditions = Conditions::default();
    sla.iter()
        .filter(|(k, _)| CONDITION_KEYS.contains(&k.as_str()))
        .try_for_each(|(k, v)| conditions.read(k, v))
}

/// The network a computer belongs to, for `mode=unique_by_network`; a
/// computer without one is a network of its own.
pub fn network_of(computer: &Computer) -> String {
    computer
        .categories
        .get("network_guid")
        .cloned()
        .unwrap_or_else(|| format!("computer:{}", computer.id))
}

impl Master {
    /// Picks a free partition for a new (non-shared) instance of `release`
    /// in tree `root`, or says why there is none.
    pub(crate) fn choose_partition(
        &self,
        filter: &Filter,
        release: &str,
        root: &str,
        seq: u64,
    ) -> Result<(ComputerId, PartitionId), String> {
        let used_networks = if filter.unique_by_network {
            self.networks_of_tree(root)
        } else {
            BTreeSet::new()
        };
        let conditions = &filter.conditions;
        // The first free partition of `slot`'s computer that the filter takes.
        let fits = |slot: &Slot| -> Option<(ComputerId, PartitionId)> {
            if !conditions.accepts_price(slot.rank.price()) {
                return None;
            }
            let computer = self.computers.get(&slot.computer)?;
            let terms = self.terms_of(computer);
            if !filter.accepts_terms(computer, &terms) || used_networks.contains(&network_of(computer)) {
                return None;
            }
            let room = self.placement.rooms.get(&slot.computer)?;
            let position = room
                .free
                .iter()
                .filter(|(caps, _)| filter.accepts_offered_capabilities(caps, terms.capabilities))
                .filter_map(|(_, positions)| positions.first())
                .min()?;
            Some((computer.id.clone(), computer.partitions.get(*position)?.clone()))
        };
        // Prices only grow along the walk: past the ceiling, nothing fits.
        let beyond = |rank: &Rank| {
            conditions
                .max_price
                .as_ref()
                .is_some_and(|max| rank.micros > max.unit_price)
        };
        let chosen = match &filter.computer_guid {
            Some(id) => self
                .placement
                .rooms
                .get(id)
                .filter(|room| room.releases.contains(release) && self.placement.sells(id, room))
                .and_then(|room| fits(&self.placement.slot(id, room, release))),
            None => {
                // What this walk learns of the slots that fail is kept for
                // the next request with the same SLA (see `SkipMemo`),
                // unless the answer depends on the tree.
                let memo = (!filter.unique_by_network && *filter != Filter::default()).then_some(filter);
                self.placement
                    .first_fitting(release, spread_point(seq), beyond, fits, memo)
            }
        };
        chosen.ok_or_else(|| {
            if !self.placement.supplied.contains_key(release) {
                format!("no computer has {release} supplied")
            } else if conditions.any() {
                format!(
                    "no offer meets the conditions ({}) with a partition free on the computers that have \
                     {release} supplied; it is allocated as soon as one does",
                    conditions.describe()
                )
            } else {
                format!("no free partition matches the SLA on the computers that have {release} supplied")
            }
        })
    }

    /// The networks the placed instances of tree `root` are on.
    fn networks_of_tree(&self, root: &str) -> BTreeSet<String> {
        let mut networks = BTreeSet::new();
        let mut stack = vec![root.to_string()];
        while let Some(id) = stack.pop() {
            if let Some((c, _)) = self.instances.get(&id).and_then(|i| i.partition.as_ref()) {
                if let Some(computer) = self.computers.get(c) {
                    networks.insert(network_of(computer));
                }
            }
            stack.extend(self.children_ids(&id).cloned());
        }
        networks
    }

    /// Finds the host of a new shared instance: the instance named by
    /// `instance_guid`, or else the first placed, live instance of the same
    /// release and software type on an accepted computer.
    pub(crate) fn choose_host(
        &self,
        filter: &Filter,
        release: &str,
        software_type: &str,
    ) -> Result<InstanceId, String> {
        let usable = |i: &Instance| {
            !i.shared
                && i.requested_state != RequestedState::Destroyed
                && i.partition
                    .as_ref()
                    .and_then(|(c, _)| self.computers.get(c))
                    .is_some_and(|c| filter.accepts_computer(c))
        };
        if let Some(guid) = &filter.instance_guid {
            return match self.instances.get(guid) {
                Some(host) if usable(host) => Ok(host.id.clone()),
                Some(_) => Err(format!(
                    "instance {guid} named by instance_guid cannot host shared instances now"
                )),
                None => Err(format!("instance {guid} named by instance_guid does not exist")),
            };
        }
        let mut hosts: Vec<&Instance> = self
            .instances
            .values()
            .map(|i| &**i)
            .filter(|i| usable(i) && i.software_release == release && i.software_type == software_type)
            .collect();
        hosts.sort_by(|a, b| a.partition.cmp(&b.partition));
        hosts.first().map(|h| h.id.clone()).ok_or_else(|| {
            format!("no started instance of {release} (type {software_type:?}) can host this shared instance")
        })
    }
}

/// Free room for placement, indexed so that choosing a partition does not
/// scan every computer.
///
/// Derived from computers, partitions, installations, offers, owners and
/// catalog prices, never stored: it is rebuilt at restore
/// ([`PlacementIndex::build`]) and kept up to date by the few commands that
/// change what it reflects: a format or a supply
/// ([`PlacementIndex::refresh`]), a placement and a freed partition
/// ([`PlacementIndex::occupy`], [`PlacementIndex::vacate`]), an offer or an
/// owner ([`PlacementIndex::set_terms`]) and a catalog hosting price
/// ([`PlacementIndex::set_catalog`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PlacementIndex {
    /// Per release: the computers that have it supplied and at least one
    /// partition to sell, by price, then load.
    candidates: BTreeMap<SoftwareUrl, BTreeSet<Slot>>,
    /// How many computers have each release supplied, with room or not (to
    /// tell "supplied nowhere" from "no room").
    supplied: BTreeMap<SoftwareUrl, usize>,
    /// Per computer: its load, its free partitions, its supplied releases.
    rooms: BTreeMap<ComputerId, Room>,
    /// Computers that sell on their own terms (an offer, or none at all).
    terms: BTreeMap<ComputerId, Sale>,
    /// The catalog's hourly hosting prices, by release ("" for every release).
    catalog: BTreeMap<SoftwareUrl, Rank>,
    /// Where walks for a given SLA may start.
    skips: SkipMemo,
}

/// Per release and SLA, a slot before which every candidate is known not
/// to fit that SLA: a request with conditions (a region, a minimum of CPUs)
/// that the cheapest computers do not meet would otherwise step over all
/// of them on every allocation, more of them as the matching ones fill.
///
/// A hint, not state: it never changes a choice, only where the walk
/// starts. It is learnt by walks (every group before the one a walk stops
/// in failed it whole) and moved back whenever a slot is listed before it
/// (a computer whose terms or partitions changed, or that freed one, is
/// unknown again), so what lies before it never fits. A partition taken
/// only moves a slot later and makes it fit less: it moves nothing back. Every slot's fit depends on its
/// computer, its terms and its free partitions, each of which relists it
/// when it changes; SLAs whose fit depends on the tree
/// (`unique_by_network`) are not kept. Not compared, cloned empty, bounded.
#[derive(Default)]
struct SkipMemo(std::sync::Mutex<BTreeMap<(SoftwareUrl, Filter), Slot>>);

/// How many SLAs the memo keeps before it starts afresh.
const SKIP_MEMO_SIZE: usize = 64;

impl SkipMemo {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(SoftwareUrl, Filter), Slot>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where a walk of `release` for `filter` may start.
    fn start(&self, release: &str, filter: &Filter) -> Option<Slot> {
        self.lock().get(&(release.to_string(), filter.clone())).cloned()
    }

    /// Every candidate of `release` before `slot` fails `filter`.
    fn learn(&self, release: &str, filter: &Filter, slot: Slot) {
        let mut memo = self.lock();
        if memo.len() >= SKIP_MEMO_SIZE {
            memo.clear();
        }
        memo.insert((release.to_string(), filter.clone()), slot);
    }

    /// `slot` was listed among the candidates of `release`: it is unknown.
    fn listed(&self, release: &str, slot: &Slot) {
        let mut memo = self.lock();
        for ((r, _), start) in memo.iter_mut() {
            if r == release && slot < start {
                *start = slot.clone();
            }
        }
    }
}

impl Clone for SkipMemo {
    fn clone(&self) -> Self {
        SkipMemo::default()
    }
}

impl PartialEq for SkipMemo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SkipMemo {}

impl std::fmt::Debug for SkipMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SkipMemo({} SLAs)", self.lock().len())
    }
}

/// How a computer that does not sell at the catalog sells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sale {
    /// Through its offer: at this price, at most this many partitions busy.
    Offer { rank: Rank, partitions: usize },
    /// Not at all: it has an owner and no offer.
    Withheld,
}

/// An hourly price as placement orders it: by amount, then currency (free
/// is zero, before any price). Plain bytes, so walking the index copies it
/// instead of allocating.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Rank {
    pub(crate) micros: i64,
    /// The ISO 4217 code's three letters; zeros when free.
    currency: [u8; 3],
}

impl Rank {
    /// After every price.
    const MAX: Rank = Rank {
        micros: i64::MAX,
        currency: [0xff; 3],
    };

    /// `price` as a rank. An offer's currency is a checked ISO 4217 code;
    /// a catalog price's code of another length becomes one no `max_price`
    /// names (it still orders by amount).
    pub(crate) fn of(price: &super::ledger::Price) -> Rank {
        let currency = <[u8; 3]>::try_from(price.currency.as_bytes()).unwrap_or([0xff; 3]);
        Rank {
            micros: price.unit_price,
            currency,
        }
    }

    /// The price, `None` when free.
    pub(crate) fn price(&self) -> Option<(&i64, &str)> {
        (self.currency != [0; 3]).then(|| (&self.micros, std::str::from_utf8(&self.currency).unwrap_or("")))
    }
}

/// A computer's place among the candidates of a release: by price, then by
/// load, then by a fixed hash of its id (where equally priced and loaded
/// computers take turns), then by id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Slot {
    rank: Rank,
    busy: usize,
    spread: u64,
    computer: ComputerId,
}

impl Slot {
    /// The first slot of the group (`rank`, `busy`) at `spread`.
    fn at(rank: &Rank, busy: usize, spread: u64) -> Slot {
        Slot {
            rank: *rank,
            busy,
            spread,
            computer: String::new(),
        }
    }
}

/// What the index knows of one computer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Room {
    /// Busy partitions.
    busy: usize,
    /// Free partitions by position in the computer's list, grouped by the
    /// capabilities they declare (usually one group: none). No empty group.
    free: BTreeMap<Vec<String>, BTreeSet<usize>>,
    /// Releases supplied to it (requested available).
    releases: BTreeSet<SoftwareUrl>,
}

impl Room {
    fn has_free(&self) -> bool {
        !self.free.is_empty()
    }
}

/// Where a computer sits among equally loaded computers: FNV-1a of its id,
/// then mixed (ids that differ in one character, COMP-1 and COMP-2, would
/// otherwise land side by side). Spelled out, not std's hasher, so every
/// replica and every version of this program computes the same value.
pub(crate) fn spread_of(computer: &str) -> u64 {
    let fnv = computer.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    mix(fnv)
}

/// Where, among equally loaded computers, the proposal numbered `seq`
/// starts looking: consecutive proposals land far apart.
pub(crate) fn spread_point(seq: u64) -> u64 {
    mix(seq)
}

/// splitmix64's finalizer: every input bit moves about half the output bits.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl PlacementIndex {
    /// The index of a whole state.
    pub(crate) fn build(
        computers: &BTreeMap<ComputerId, Computer>,
        partitions: &BTreeMap<(ComputerId, PartitionId), Partition>,
        installations: &BTreeMap<(ComputerId, SoftwareUrl), SoftwareInstallation>,
        terms: BTreeMap<ComputerId, Sale>,
        catalog: BTreeMap<SoftwareUrl, Rank>,
    ) -> Self {
        let mut index = Self {
            terms,
            catalog,
            ..Self::default()
        };
        for id in computers.keys() {
            index.refresh(id, computers, partitions, installations);
        }
        index
    }

    /// Re-reads computer `id` (its partitions and supplies) from the state.
    pub(crate) fn refresh(
        &mut self,
        id: &str,
        computers: &BTreeMap<ComputerId, Computer>,
        partitions: &BTreeMap<(ComputerId, PartitionId), Partition>,
        installations: &BTreeMap<(ComputerId, SoftwareUrl), SoftwareInstallation>,
    ) {
        if let Some(old) = self.rooms.remove(id) {
            self.unlist(id, &old);
            for release in &old.releases {
                if let Some(n) = self.supplied.get_mut(release) {
                    *n -= 1;
                    if *n == 0 {
                        self.supplied.remove(release);
                    }
                }
            }
        }
        let Some(computer) = computers.get(id) else { return };
        let mut room = Room::default();
        for (position, pid) in computer.partitions.iter().enumerate() {
            let Some(p) = partitions.get(&(id.to_string(), pid.clone())) else {
                continue;
            };
            match p.state {
                SlapState::Busy => room.busy += 1,
                SlapState::Free => {
                    room.free.entry(p.capabilities.clone()).or_default().insert(position);
                }
            }
        }
        room.releases = installations
            .range((id.to_string(), String::new())..)
            .take_while(|((c, _), _)| c == id)
            .filter(|(_, s)| s.requested == SupplyState::Available)
            .map(|((_, url), _)| url.clone())
            .collect();
        for release in &room.releases {
            *self.supplied.entry(release.clone()).or_default() += 1;
        }
        self.list(id, &room, true);
        self.rooms.insert(id.to_string(), room);
    }

    /// Partition `position` of `computer` (declaring `capabilities`) took an instance.
    pub(crate) fn occupy(&mut self, computer: &str, position: usize, capabilities: &[String]) {
        self.change(computer, false, |room| {
            if let Some(free) = room.free.get_mut(capabilities) {
                if free.remove(&position) {
                    room.busy += 1;
                }
                if free.is_empty() {
                    room.free.remove(capabilities);
                }
            }
        });
    }

    /// Partition `position` of `computer` (declaring `capabilities`) is free again.
    pub(crate) fn vacate(&mut self, computer: &str, position: usize, capabilities: &[String]) {
        self.change(computer, true, |room| {
            if room.free.entry(capabilities.to_vec()).or_default().insert(position) {
                room.busy = room.busy.saturating_sub(1);
            }
        });
    }

    /// Computer `computer` sells on `sale` from now on (`None`: at the catalog).
    pub(crate) fn set_terms(&mut self, computer: &str, sale: Option<Sale>) {
        let room = self.rooms.remove(computer);
        if let Some(room) = &room {
            self.unlist(computer, room);
        }
        match sale {
            Some(s) => self.terms.insert(computer.to_string(), s),
            None => self.terms.remove(computer),
        };
        if let Some(room) = room {
            self.list(computer, &room, true);
            self.rooms.insert(computer.to_string(), room);
        }
    }

    /// The catalog's hourly hosting price of `release` ("" for every
    /// release) is `rank` from now on (`None`: no price).
    pub(crate) fn set_catalog(&mut self, release: &str, rank: Option<Rank>) {
        // Computers on the catalog that have this release (any, for the
        // general price) move; the others keep their place.
        let moved: Vec<ComputerId> = self
            .rooms
            .iter()
            .filter(|(id, room)| {
                !self.terms.contains_key(*id) && (release.is_empty() || room.releases.contains(release))
            })
            .map(|(id, _)| id.clone())
            .collect();
        let rooms: Vec<(ComputerId, Room)> = moved
            .into_iter()
            .filter_map(|id| self.rooms.remove(&id).map(|r| (id, r)))
            .collect();
        for (id, room) in &rooms {
            self.unlist(id, room);
        }
        match rank {
            Some(r) => self.catalog.insert(release.to_string(), r),
            None => self.catalog.remove(release),
        };
        for (id, room) in rooms {
            self.list(&id, &room, true);
            self.rooms.insert(id, room);
        }
    }

    /// Applies `f` to `computer`'s room and lists it again; `unknown`
    /// unless `f` can only make it fit fewer requests (a partition taken:
    /// a slot known to fail an SLA still does, only later in the order).
    fn change(&mut self, computer: &str, unknown: bool, f: impl FnOnce(&mut Room)) {
        let Some(mut room) = self.rooms.remove(computer) else {
            return;
        };
        self.unlist(computer, &room);
        f(&mut room);
        self.list(computer, &room, unknown);
        self.rooms.insert(computer.to_string(), room);
    }

    /// The hourly price `computer` sells `release` at.
    fn rank(&self, computer: &str, release: &str) -> Rank {
        match self.terms.get(computer) {
            Some(Sale::Offer { rank, .. }) => *rank,
            _ => self
                .catalog
                .get(release)
                .or_else(|| self.catalog.get(""))
                .copied()
                .unwrap_or_default(),
        }
    }

    /// Whether `computer` has a partition to sell now.
    fn sells(&self, computer: &str, room: &Room) -> bool {
        room.has_free()
            && match self.terms.get(computer) {
                None => true,
                Some(Sale::Offer { partitions, .. }) => room.busy < *partitions,
                Some(Sale::Withheld) => false,
            }
    }

    fn slot(&self, computer: &str, room: &Room, release: &str) -> Slot {
        Slot {
            rank: self.rank(computer, release),
            busy: room.busy,
            spread: spread_of(computer),
            computer: computer.to_string(),
        }
    }

    fn list(&mut self, computer: &str, room: &Room, unknown: bool) {
        if !self.sells(computer, room) {
            return;
        }
        for release in &room.releases {
            let slot = self.slot(computer, room, release);
            if unknown {
                self.skips.listed(release, &slot);
            }
            self.candidates.entry(release.clone()).or_default().insert(slot);
        }
    }

    fn unlist(&mut self, computer: &str, room: &Room) {
        for release in &room.releases {
            let slot = self.slot(computer, room, release);
            if let Some(set) = self.candidates.get_mut(release) {
                set.remove(&slot);
                if set.is_empty() {
                    self.candidates.remove(release);
                }
            }
        }
    }

    /// The first candidate of `release` that `fits` accepts: cheapest
    /// first, then least loaded; among equally priced and loaded ones,
    /// from `point` on, wrapping around. Stops at the first price that is
    /// `beyond` what the request pays. With `memo`, starts where earlier
    /// walks for that SLA showed nothing before fits, and records where
    /// this one stopped.
    fn first_fitting<T>(
        &self,
        release: &str,
        point: u64,
        beyond: impl Fn(&Rank) -> bool,
        fits: impl Fn(&Slot) -> Option<T>,
        memo: Option<&Filter>,
    ) -> Option<T> {
        let set = self.candidates.get(release)?;
        let known = memo.and_then(|f| self.skips.start(release, f));
        let first = match &known {
            Some(start) => set.range((Bound::Included(start), Bound::Unbounded)).next(),
            None => set.first(),
        };
        let mut group = first.map(|s| (s.rank, s.busy));
        let found = loop {
            let Some((rank, busy)) = group else { break None };
            if beyond(&rank) {
                break None;
            }
            let end = Slot::at(&rank, busy + 1, 0);
            let after_point = set.range((
                Bound::Included(Slot::at(&rank, busy, point)),
                Bound::Excluded(end.clone()),
            ));
            let before_point = set.range((
                Bound::Included(Slot::at(&rank, busy, 0)),
                Bound::Excluded(Slot::at(&rank, busy, point)),
            ));
            if let Some(found) = after_point.chain(before_point).find_map(&fits) {
                break Some(found);
            }
            group = set
                .range((Bound::Included(end), Bound::Unbounded))
                .next()
                .map(|s| (s.rank, s.busy));
        };
        if let Some(filter) = memo {
            // Every group before this one failed whole; with none left,
            // or only dearer ones, everything listed now fails.
            let stop = match group {
                Some((rank, busy)) if !beyond(&rank) => Slot::at(&rank, busy, 0),
                Some((rank, _)) => Slot::at(&rank, 0, 0),
                None => Slot::at(&Rank::MAX, usize::MAX, u64::MAX),
            };
            if known.as_ref() != Some(&stop) {
                self.skips.learn(release, filter, stop);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sla(pairs: &[(&str, &str)]) -> Params {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn unknown_key_makes_placement_impossible() {
        let err = Filter::parse(&sla(&[("colour", "blue")]), false).unwrap_err();
        assert!(err.contains("colour"), "{err}");
        assert!(Filter::parse(&sla(&[("mode", "anywhere")]), false).is_err());
        assert!(Filter::parse(&sla(&[("instance_guid", "SOFTINST-1")]), false).is_err());
        assert!(Filter::parse(&sla(&[("instance_guid", "SOFTINST-1")]), true).is_ok());
    }

    #[test]
    fn categories_and_passthrough() {
        let f = Filter::parse(&sla(&[("region", "eu"), ("retention_delay", "3")]), false).unwrap();
        assert_eq!(f.categories, vec![("region".into(), "eu".into())]);
        let mut c = Computer {
            id: "COMP-1".into(),
            address: String::new(),
            netmask: String::new(),
            capacity: Params::new(),
            categories: sla(&[("region", "eu")]),
            partitions: vec![],
            revision: 0,
        };
        assert!(f.accepts_computer(&c));
        c.categories = sla(&[("region", "us")]);
        assert!(!f.accepts_computer(&c));
    }
}
