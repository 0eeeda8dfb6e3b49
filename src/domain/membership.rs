//! The rules of group membership, as pure functions over a chat's current
//! members. A store evaluates them inside the transaction that applies the
//! change (so the check and the change cannot be split by another write),
//! then writes the [`Effect`]s it returns, one timeline event each.
//!
//! * Only members act; a direct chat has no member operations.
//! * Admins add, remove, change roles and rename; anyone may leave.
//! * When the last admin leaves (or steps down), the longest-standing
//!   remaining member becomes admin. The last member leaving leaves the
//!   group stored and readable by nobody.
//! * A change that changes nothing (adding a member, setting the role or
//!   title it already has) is accepted and writes nothing.

use crate::ids::{MessageId, UserId};
use crate::store::{ChatKind, GroupChange, MessageKind, Role};

/// Why a change (or a read marker) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The actor is not a member (or there is no such chat).
    NotMember,
    /// Member operations on a direct chat.
    NotAGroup,
    /// The actor's role does not allow this.
    Forbidden,
    /// The user acted upon is not a member.
    TargetNotMember,
    /// The group is full (`chats.max_members`).
    TooManyMembers,
    /// A read marker above the chat's latest message.
    BeyondLatest,
}

/// A chat's members as stored, in join order (longest-standing first).
#[derive(Debug, Clone, Copy)]
pub struct Roster<'a> {
    pub kind: ChatKind,
    pub title: Option<&'a str>,
    pub members: &'a [(UserId, Role)],
}

/// One thing a change does; each becomes one timeline event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Added(UserId),
    Removed(UserId),
    /// `automatic`: a promotion because the last admin left or stepped down.
    RoleChanged {
        user: UserId,
        role: Role,
        automatic: bool,
    },
    TitleChanged(String),
}

impl Effect {
    pub fn kind(&self) -> MessageKind {
        match self {
            Effect::Added(_) => MessageKind::MemberAdded,
            Effect::Removed(_) => MessageKind::MemberRemoved,
            Effect::RoleChanged { .. } => MessageKind::RoleChanged,
            Effect::TitleChanged(_) => MessageKind::TitleChanged,
        }
    }

    /// The user the event is about, if any.
    pub fn subject(&self) -> Option<UserId> {
        match self {
            Effect::Added(u) | Effect::Removed(u) | Effect::RoleChanged { user: u, .. } => Some(*u),
            Effect::TitleChanged(_) => None,
        }
    }
}

impl Roster<'_> {
    fn role_of(&self, user: UserId) -> Option<Role> {
        self.members
            .iter()
            .find(|(id, _)| *id == user)
            .map(|(_, r)| *r)
    }
}

/// What `change` by `actor` does to the group, or why it is refused.
pub fn plan(
    roster: Roster<'_>,
    actor: UserId,
    change: &GroupChange,
    max_members: usize,
) -> Result<Vec<Effect>, Refusal> {
    let actor_role = roster.role_of(actor).ok_or(Refusal::NotMember)?;
    if roster.kind != ChatKind::Group {
        return Err(Refusal::NotAGroup);
    }
    let admin = actor_role == Role::Admin;
    match change {
        GroupChange::AddMember(user) => {
            if !admin {
                return Err(Refusal::Forbidden);
            }
            if roster.role_of(*user).is_some() {
                return Ok(Vec::new());
            }
            if roster.members.len() >= max_members {
                return Err(Refusal::TooManyMembers);
            }
            Ok(vec![Effect::Added(*user)])
        }
        GroupChange::RemoveMember(user) => {
            if *user != actor && !admin {
                return Err(Refusal::Forbidden);
            }
            let role = roster.role_of(*user).ok_or(Refusal::TargetNotMember)?;
            let mut effects = vec![Effect::Removed(*user)];
            if role == Role::Admin {
                effects.extend(promotion(roster, *user));
            }
            Ok(effects)
        }
        GroupChange::SetRole(user, role) => {
            if !admin {
                return Err(Refusal::Forbidden);
            }
            let current = roster.role_of(*user).ok_or(Refusal::TargetNotMember)?;
            if current == *role {
                return Ok(Vec::new());
            }
            let change = Effect::RoleChanged {
                user: *user,
                role: *role,
                automatic: false,
            };
            if *role == Role::Member {
                // Stepping down as the last admin hands the role on; the
                // only member of a group stays its admin.
                return match promotion(roster, *user) {
                    Some(p) => Ok(vec![change, p]),
                    None if last_admin(roster, *user) => Ok(Vec::new()),
                    None => Ok(vec![change]),
                };
            }
            Ok(vec![change])
        }
        GroupChange::SetTitle(title) => {
            if !admin {
                return Err(Refusal::Forbidden);
            }
            if roster.title == Some(title.as_str()) {
                return Ok(Vec::new());
            }
            Ok(vec![Effect::TitleChanged(title.clone())])
        }
    }
}

/// True when `leaving` is the only admin.
fn last_admin(roster: Roster<'_>, leaving: UserId) -> bool {
    !roster
        .members
        .iter()
        .any(|(id, r)| *id != leaving && *r == Role::Admin)
}

/// The promotion due when the admin `leaving` goes: the longest-standing
/// other member, if no other admin remains and anyone does.
fn promotion(roster: Roster<'_>, leaving: UserId) -> Option<Effect> {
    if !last_admin(roster, leaving) {
        return None;
    }
    roster
        .members
        .iter()
        .find(|(id, _)| *id != leaving)
        .map(|(id, _)| Effect::RoleChanged {
            user: *id,
            role: Role::Admin,
            automatic: true,
        })
}

/// Checks a read marker against the chat's latest message id.
pub fn check_marker(up_to: MessageId, latest: MessageId) -> Result<(), Refusal> {
    if up_to > latest {
        Err(Refusal::BeyondLatest)
    } else {
        Ok(())
    }
}

/// The readable sentence of an event (a v1 client shows it as text).
/// `actor` made the change; `subject` is the user it is about.
pub fn describe(effect: &Effect, actor: &str, subject: Option<&str>) -> String {
    let subject = subject.unwrap_or("someone");
    match effect {
        Effect::Added(_) => format!("{actor} added {subject}"),
        Effect::Removed(_) if subject == actor => format!("{actor} left"),
        Effect::Removed(_) => format!("{actor} removed {subject}"),
        Effect::RoleChanged {
            automatic: true, ..
        } => format!("{subject} is now an admin"),
        Effect::RoleChanged {
            role: Role::Admin, ..
        } => format!("{actor} made {subject} an admin"),
        Effect::RoleChanged { .. } => format!("{actor} made {subject} a member"),
        Effect::TitleChanged(title) => format!("{actor} renamed the group to \"{title}\""),
    }
}

/// The sentence of a group's `chat_created` event.
pub fn describe_created(actor: &str, title: &str) -> String {
    format!("{actor} created the group \"{title}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: UserId = UserId(1);
    const B: UserId = UserId(2);
    const C: UserId = UserId(3);
    const D: UserId = UserId(4);

    fn group(members: &[(UserId, Role)]) -> Roster<'_> {
        Roster {
            kind: ChatKind::Group,
            title: Some("t"),
            members,
        }
    }

    #[test]
    fn only_members_act_and_direct_chats_have_no_member_operations() {
        let members = [(A, Role::Admin), (B, Role::Member)];
        let add = GroupChange::AddMember(C);
        assert_eq!(plan(group(&members), D, &add, 10), Err(Refusal::NotMember));
        let direct = Roster {
            kind: ChatKind::Direct,
            title: None,
            members: &members,
        };
        assert_eq!(plan(direct, A, &add, 10), Err(Refusal::NotAGroup));
    }

    #[test]
    fn admins_add_remove_and_rename_members_may_only_leave() {
        let members = [(A, Role::Admin), (B, Role::Member), (C, Role::Member)];
        let g = group(&members);
        assert_eq!(
            plan(g, A, &GroupChange::AddMember(D), 10),
            Ok(vec![Effect::Added(D)])
        );
        assert_eq!(
            plan(g, B, &GroupChange::AddMember(D), 10),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            plan(g, B, &GroupChange::RemoveMember(C), 10),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            plan(g, B, &GroupChange::RemoveMember(B), 10),
            Ok(vec![Effect::Removed(B)])
        );
        assert_eq!(
            plan(g, A, &GroupChange::RemoveMember(D), 10),
            Err(Refusal::TargetNotMember)
        );
        assert_eq!(
            plan(g, B, &GroupChange::SetTitle("x".into()), 10),
            Err(Refusal::Forbidden)
        );
    }

    #[test]
    fn changes_that_change_nothing_write_nothing() {
        let members = [(A, Role::Admin), (B, Role::Member)];
        let g = group(&members);
        assert_eq!(plan(g, A, &GroupChange::AddMember(B), 10), Ok(vec![]));
        assert_eq!(
            plan(g, A, &GroupChange::SetRole(B, Role::Member), 10),
            Ok(vec![])
        );
        assert_eq!(
            plan(g, A, &GroupChange::SetTitle("t".into()), 10),
            Ok(vec![])
        );
    }

    #[test]
    fn a_full_group_refuses_new_members() {
        let members = [(A, Role::Admin), (B, Role::Member)];
        assert_eq!(
            plan(group(&members), A, &GroupChange::AddMember(C), 2),
            Err(Refusal::TooManyMembers)
        );
    }

    #[test]
    fn the_last_admin_leaving_promotes_the_longest_standing_member() {
        let members = [(B, Role::Member), (A, Role::Admin), (C, Role::Member)];
        let effects = plan(group(&members), A, &GroupChange::RemoveMember(A), 10).unwrap();
        assert_eq!(
            effects,
            vec![
                Effect::Removed(A),
                Effect::RoleChanged {
                    user: B,
                    role: Role::Admin,
                    automatic: true
                }
            ]
        );
        // Another admin remains: no promotion.
        let members = [(B, Role::Member), (A, Role::Admin), (C, Role::Admin)];
        assert_eq!(
            plan(group(&members), A, &GroupChange::RemoveMember(A), 10),
            Ok(vec![Effect::Removed(A)])
        );
        // The last member leaves: nobody to promote.
        let members = [(A, Role::Admin)];
        assert_eq!(
            plan(group(&members), A, &GroupChange::RemoveMember(A), 10),
            Ok(vec![Effect::Removed(A)])
        );
    }

    #[test]
    fn the_last_admin_stepping_down_hands_the_role_on() {
        let members = [(A, Role::Admin), (B, Role::Member)];
        let effects = plan(
            group(&members),
            A,
            &GroupChange::SetRole(A, Role::Member),
            10,
        )
        .unwrap();
        assert_eq!(effects.len(), 2);
        assert_eq!(
            effects[1],
            Effect::RoleChanged {
                user: B,
                role: Role::Admin,
                automatic: true
            }
        );
        let alone = [(A, Role::Admin)];
        assert_eq!(
            plan(group(&alone), A, &GroupChange::SetRole(A, Role::Member), 10),
            Ok(vec![])
        );
    }

    #[test]
    fn events_read_as_sentences() {
        assert_eq!(
            describe(&Effect::Added(B), "alice", Some("bob")),
            "alice added bob"
        );
        assert_eq!(
            describe(&Effect::Removed(A), "alice", Some("alice")),
            "alice left"
        );
        assert_eq!(
            describe(&Effect::Removed(B), "alice", Some("bob")),
            "alice removed bob"
        );
        assert_eq!(
            describe(
                &Effect::RoleChanged {
                    user: B,
                    role: Role::Admin,
                    automatic: false
                },
                "alice",
                Some("bob")
            ),
            "alice made bob an admin"
        );
    }
}
