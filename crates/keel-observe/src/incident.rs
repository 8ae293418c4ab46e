//! Alerts, and incidents: the alerts of one cause (one breaker, one agent's trajectories)
//! grouped, with a timeline, open until the condition is resolved.

use std::collections::{HashMap, VecDeque};

use keel_config::Severity;
use serde::Serialize;
use serde_json::{Map, Value};

/// How long an incident raised by one-off events (a dead task, a loop) stays open without
/// a new alert of its cause; incidents of conditions (a breaker, an anomaly) close when
/// the condition clears.
pub const QUIET: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Closed incidents kept for `GET /v1/incidents`.
const KEEP_CLOSED: usize = 200;

/// One alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// Its cause: alerts with one key are one incident (`breaker:sim/primary`).
    pub key: String,
    /// How bad.
    pub severity: Severity,
    /// One line, for a title.
    pub title: String,
    /// What happened and what to look at.
    pub message: String,
    /// Facts, for the payload and the event (`agent`, `route`, `target`, figures).
    pub labels: Map<String, Value>,
    /// The task it is about, if any.
    pub task: Option<String>,
    /// `true` for a condition that is resolved explicitly (a breaker closing, a signal
    /// back to normal); `false` for one-off events, closed after [`QUIET`].
    pub condition: bool,
    /// Already in the log (raised by another part of keel as an `alert_raised` event):
    /// not recorded again.
    pub recorded: bool,
}

/// One line of an incident's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// RFC 3339 UTC.
    pub at: String,
    /// `firing` or `resolved`.
    pub status: &'static str,
    /// The alert's severity (of a resolution: the incident's).
    pub severity: &'static str,
    /// What it said.
    pub message: String,
    /// The task the alert was about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// Alerts of one cause.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    /// `inc_N`, unique in this keel's life.
    pub id: String,
    /// The cause.
    pub key: String,
    /// The worst severity so far.
    pub severity: &'static str,
    /// `open` or `resolved`.
    pub state: &'static str,
    /// The first alert's title.
    pub title: String,
    /// The first alert's labels.
    pub labels: Map<String, Value>,
    /// When it opened (RFC 3339 UTC).
    pub opened_at: String,
    /// When it was resolved.
    pub resolved_at: Option<String>,
    /// Alerts in it.
    pub alerts: u64,
    /// Every alert and the resolution, oldest first.
    pub timeline: Vec<Entry>,
    #[serde(skip)]
    rank: Severity,
    #[serde(skip)]
    condition: bool,
    #[serde(skip)]
    last_ms: i64,
}

impl Entry {
    /// The timeline line of `alert`, raised at `at`.
    fn firing(alert: &Alert, at: &str) -> Self {
        Self {
            at: at.to_owned(),
            status: "firing",
            severity: alert.severity.as_str(),
            message: alert.message.clone(),
            task: alert.task.clone(),
        }
    }
}

/// What an alert did to the incidents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouped {
    /// It opened an incident.
    Opened,
    /// It made an open incident worse.
    Escalated,
    /// It joined an open incident of the same or a worse severity.
    Joined,
}

/// Every open incident, and the latest resolved ones.
#[derive(Debug, Default)]
pub struct Incidents {
    open: HashMap<String, Incident>,
    resolved: VecDeque<Incident>,
    next: u64,
}

impl Incidents {
    /// Adds `alert` at `at` (`now_ms` in Unix ms): to its open incident, or a new one.
    pub fn raise(&mut self, alert: &Alert, at: &str, now_ms: i64) -> (Grouped, String) {
        if let Some(incident) = self.open.get_mut(&alert.key) {
            incident.timeline.push(Entry::firing(alert, at));
            incident.alerts += 1;
            incident.last_ms = now_ms;
            let grouped = if alert.severity > incident.rank {
                incident.rank = alert.severity;
                incident.severity = alert.severity.as_str();
                Grouped::Escalated
            } else {
                Grouped::Joined
            };
            return (grouped, incident.id.clone());
        }
        self.next += 1;
        let id = format!("inc_{}", self.next);
        self.open_incident(alert, at, now_ms, id.clone());
        (Grouped::Opened, id)
    }

    fn open_incident(&mut self, alert: &Alert, at: &str, now_ms: i64, id: String) {
        let entry = Entry::firing(alert, at);
        self.open.insert(
            alert.key.clone(),
            Incident {
                id,
                key: alert.key.clone(),
                severity: alert.severity.as_str(),
                state: "open",
                title: alert.title.clone(),
                labels: alert.labels.clone(),
                opened_at: at.to_owned(),
                resolved_at: None,
                alerts: 1,
                timeline: vec![entry],
                rank: alert.severity,
                condition: alert.condition,
                last_ms: now_ms,
            },
        );
    }

    /// Replays one `alert_raised` event the observer recorded (`source: "observe"`, about
    /// `task` if any), so that the incidents of an earlier run are back after a restart, with
    /// their ids.
    pub fn replay(&mut self, data: &Value, task: Option<&str>, at_ms: i64) {
        let text = |k: &str| data[k].as_str().unwrap_or_default().to_owned();
        let (key, id, at) = (text("key"), text("incident"), text("at"));
        if key.is_empty() || id.is_empty() {
            return;
        }
        if let Some(n) = id.strip_prefix("inc_").and_then(|n| n.parse::<u64>().ok()) {
            self.next = self.next.max(n);
        }
        if data["status"] == "resolved" {
            self.resolve(&key, &text("message"), &at);
            return;
        }
        let severity = match data["severity"].as_str() {
            Some("critical") => Severity::Critical,
            Some("info") => Severity::Info,
            _ => Severity::Warning,
        };
        let alert = Alert {
            condition: key.starts_with("breaker:") || key.starts_with("anomaly:"),
            key: key.clone(),
            severity,
            title: text("title"),
            message: text("message"),
            labels: data["labels"].as_object().cloned().unwrap_or_default(),
            task: task.map(str::to_owned),
            recorded: true,
        };
        if self.open.contains_key(&key) {
            self.raise(&alert, &at, at_ms);
        } else {
            // The incident keeps the id it had.
            self.open_incident(&alert, &at, at_ms, id);
        }
    }

    /// Adds `alert` to its incident if that is open (a replayed alert of another part of
    /// keel, whose incident's opening the observer recorded); nothing otherwise.
    pub fn join(&mut self, alert: &Alert, at: &str, at_ms: i64) {
        if self.open.contains_key(&alert.key) {
            self.raise(alert, at, at_ms);
        }
    }

    /// The keys of open incidents of conditions (breakers, anomalies): after a restart their
    /// condition starts over (breakers closed, baselines learnt again).
    pub fn conditions(&self) -> Vec<String> {
        self.open
            .values()
            .filter(|i| i.condition)
            .map(|i| i.key.clone())
            .collect()
    }

    /// Resolves the open incident of `key`, if there is one, saying `message`.
    pub fn resolve(&mut self, key: &str, message: &str, at: &str) -> Option<Incident> {
        let mut incident = self.open.remove(key)?;
        incident.timeline.push(Entry {
            at: at.to_owned(),
            status: "resolved",
            severity: incident.severity,
            message: message.to_owned(),
            task: None,
        });
        incident.state = "resolved";
        incident.resolved_at = Some(at.to_owned());
        if self.resolved.len() >= KEEP_CLOSED {
            self.resolved.pop_front();
        }
        self.resolved.push_back(incident.clone());
        Some(incident)
    }

    /// The keys of event incidents with no alert for [`QUIET`] before `now_ms`.
    pub fn quiet(&self, now_ms: i64) -> Vec<String> {
        let quiet = i64::try_from(QUIET.as_millis()).unwrap_or(i64::MAX);
        self.open
            .values()
            .filter(|i| !i.condition && now_ms.saturating_sub(i.last_ms) >= quiet)
            .map(|i| i.key.clone())
            .collect()
    }

    /// Open incidents (worst first, then newest), then resolved ones (newest first).
    pub fn list(&self, open: bool, resolved: bool) -> Vec<Incident> {
        let mut out: Vec<Incident> = Vec::new();
        if open {
            let mut open: Vec<&Incident> = self.open.values().collect();
            open.sort_by(|a, b| b.rank.cmp(&a.rank).then(b.opened_at.cmp(&a.opened_at)));
            out.extend(open.into_iter().cloned());
        }
        if resolved {
            out.extend(self.resolved.iter().rev().cloned());
        }
        out
    }

    /// Open incidents by severity.
    pub fn open_count(&self, severity: Severity) -> usize {
        self.open.values().filter(|i| i.rank == severity).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(key: &str, severity: Severity) -> Alert {
        Alert {
            key: key.into(),
            severity,
            title: format!("{key} is bad"),
            message: format!("{key}: {}", severity.as_str()),
            labels: Map::new(),
            task: None,
            condition: true,
            recorded: false,
        }
    }

    #[test]
    fn replayed_alerts_of_another_part_join_only_an_open_incident() {
        let mut incidents = Incidents::default();
        // The observer's record of the opening, then two more budget warnings.
        let opening = serde_json::json!({"key": "budget:a:tokens", "incident": "inc_7",
            "status": "firing", "severity": "warning", "title": "t", "message": "m", "at": "t0"});
        incidents.replay(&opening, None, 1_000);
        let warning = Alert {
            recorded: true,
            condition: false,
            ..alert("budget:a:tokens", Severity::Warning)
        };
        incidents.join(&warning, "t1", 2_000);
        incidents.join(&warning, "t2", 900_000);
        incidents.join(&alert("budget:b:tokens", Severity::Warning), "t3", 3_000);
        let open = incidents.list(true, false);
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!((open[0].id.as_str(), open[0].alerts), ("inc_7", 3));
        assert_eq!(
            open[0].last_ms, 900_000,
            "quiet is measured from the last alert"
        );
    }

    #[test]
    fn alerts_of_one_cause_are_one_incident_until_resolved() {
        let mut incidents = Incidents::default();
        let (g, id) = incidents.raise(&alert("breaker:a", Severity::Warning), "t1", 1);
        assert_eq!(g, Grouped::Opened);
        assert_eq!(
            incidents.raise(&alert("breaker:a", Severity::Warning), "t2", 2),
            (Grouped::Joined, id.clone())
        );
        assert_eq!(
            incidents.raise(&alert("breaker:a", Severity::Critical), "t3", 3),
            (Grouped::Escalated, id.clone())
        );
        let (_, other) = incidents.raise(&alert("breaker:b", Severity::Warning), "t4", 4);
        assert_ne!(other, id);
        let listed = incidents.list(true, false);
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].id, id, "the critical one first");
        assert_eq!(listed[0].alerts, 3);
        let done = incidents
            .resolve("breaker:a", "closed again", "t5")
            .unwrap();
        assert_eq!(done.state, "resolved");
        assert_eq!(done.timeline.len(), 4);
        assert_eq!(done.timeline[3].status, "resolved");
        assert!(incidents.resolve("breaker:a", "again", "t6").is_none());
        // A new alert of the same cause is a new incident.
        let (g, again) = incidents.raise(&alert("breaker:a", Severity::Warning), "t7", 7);
        assert_eq!(g, Grouped::Opened);
        assert_ne!(again, id);
        assert_eq!(incidents.list(false, true)[0].id, id);
    }

    #[test]
    fn a_restart_replays_the_recorded_alerts_with_their_ids() {
        let mut first = Incidents::default();
        let mut recorded = Vec::new();
        let mut record = |incidents: &mut Incidents, key: &str, severity, status: &str, at_ms| {
            let (id, message) = if status == "firing" {
                let (_, id) = incidents.raise(&alert(key, severity), "t", at_ms);
                (id, "bad".to_owned())
            } else {
                let done = incidents.resolve(key, "fine again", "t").unwrap();
                (done.id, "fine again".to_owned())
            };
            recorded.push((
                serde_json::json!({"key": key, "incident": id, "status": status, "severity": severity.as_str(),
                    "title": format!("{key} is bad"), "message": message, "at": "t", "labels": {}}),
                at_ms,
            ));
        };
        record(&mut first, "dlq:a", Severity::Warning, "firing", 1);
        record(&mut first, "breaker:x", Severity::Critical, "firing", 2);
        record(&mut first, "dlq:a", Severity::Warning, "firing", 3);
        record(&mut first, "loop:b", Severity::Warning, "firing", 4);
        record(&mut first, "loop:b", Severity::Warning, "resolved", 5);
        let mut again = Incidents::default();
        for (data, at_ms) in &recorded {
            again.replay(data, None, *at_ms);
        }
        let ids = |i: &Incidents| {
            let mut v: Vec<(String, String, u64)> = i
                .list(true, true)
                .into_iter()
                .map(|i| (i.id, i.state.to_owned(), i.alerts))
                .collect();
            v.sort();
            v
        };
        assert_eq!(ids(&again), ids(&first));
        assert_eq!(again.conditions(), vec!["breaker:x".to_owned()]);
        let (_, next) = again.raise(&alert("new", Severity::Info), "t", 6);
        assert_eq!(next, "inc_4", "ids go on after the replayed ones");
    }

    #[test]
    fn event_incidents_close_after_a_quiet_period() {
        let mut incidents = Incidents::default();
        let mut dead = alert("dlq", Severity::Warning);
        dead.condition = false;
        incidents.raise(&dead, "t1", 0);
        incidents.raise(&alert("breaker:a", Severity::Critical), "t1", 0);
        let quiet = i64::try_from(QUIET.as_millis()).unwrap();
        assert!(incidents.quiet(quiet - 1).is_empty());
        assert_eq!(incidents.quiet(quiet), vec!["dlq".to_owned()]);
    }
}
