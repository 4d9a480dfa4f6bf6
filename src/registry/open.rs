//! Opening, retargeting and re-tokening sessions: each takes the vm_id's lock, changes the table,
//! commits the change to the state file and undoes it when the write fails.

use super::*;

impl SessionRegistry {
    /// Binds a port, starts the session's server and enters it in the table (not yet durable).
    pub(super) fn start_session(
        &self,
        vm_id: &str,
        target: Target,
        token: SessionToken,
        created_at: SystemTime,
        limits: SessionLimits,
        port: PortChoice,
    ) -> Result<Arc<Session>, SessionError> {
        let (lease, listener) = match port {
            PortChoice::Any => self.pool.allocate()?,
            PortChoice::AnyUncapped => self.pool.allocate_uncapped()?,
            PortChoice::Restore(p) => self.pool.allocate_port(p)?,
            PortChoice::None { capped } => {
                let session = Session::new(
                    vm_id,
                    None,
                    token,
                    created_at,
                    target,
                    limits,
                    &self.ctx.root,
                );
                self.by_vm.insert(vm_id.to_owned(), Arc::clone(&session));
                // Entered first, counted after: two opens racing for the last place may both
                // be refused, but the cap is never passed.
                let cap = self.max_sessions();
                if capped && self.by_vm.len() > cap {
                    self.by_vm.remove_if(vm_id, |_, s| Arc::ptr_eq(s, &session));
                    session.begin_stop();
                    return Err(SessionError::Pool(PoolError::SessionCap {
                        sessions: self.by_vm.len(),
                        cap,
                    }));
                }
                return Ok(session);
            }
        };
        let port = lease.port();
        let session = Session::new(
            vm_id,
            Some(port),
            token,
            created_at,
            target,
            limits,
            &self.ctx.root,
        );
        // On error the lease and listener drop here: the port goes back to the pool.
        let task = server::spawn_session_server(
            listener,
            lease,
            Arc::clone(&session),
            Arc::clone(&self.ctx),
        )
        .map_err(|source| SessionError::Listener { port, source })?;
        session.set_server_task(task);
        self.by_vm.insert(vm_id.to_owned(), Arc::clone(&session));
        Ok(session)
    }

    /// Opens a session for `vm_id`, or returns the existing one (retargeted if `target`
    /// differs). Returns once the change is on disk; a failed write rolls it back. `limits`
    /// apply to a session this call creates; an existing session keeps the ones it has.
    pub async fn open(
        &self,
        vm_id: &str,
        target: &str,
        limits: SessionLimits,
    ) -> Result<(Arc<Session>, Opened), SessionError> {
        self.open_or_retarget(vm_id, target, limits, true).await
    }

    /// Points the existing session of `vm_id` at `target` (port and token kept; viewers of
    /// the old target get 1012), checked under the vm_id's lock: `NotFound` if it has none,
    /// so a session closed meanwhile is not opened again.
    pub async fn retarget(
        &self,
        vm_id: &str,
        target: &str,
    ) -> Result<(Arc<Session>, Opened), SessionError> {
        self.open_or_retarget(vm_id, target, SessionLimits::default(), false)
            .await
    }

    async fn open_or_retarget(
        &self,
        vm_id: &str,
        target: &str,
        limits: SessionLimits,
        create: bool,
    ) -> Result<(Arc<Session>, Opened), SessionError> {
        validate_vm_id(vm_id)?;
        let target: Target = target.parse()?;
        let _guard = self.lock_vm(vm_id).await;
        if let Some(session) = self.get(vm_id) {
            // A limit the caller gives must be the one the session has: silently keeping the
            // old one would leave the caller believing its value applies.
            for (field, asked, have) in [
                (
                    "idle_timeout",
                    limits.idle_timeout,
                    session.limits.idle_timeout,
                ),
                (
                    "max_lifetime",
                    limits.max_lifetime,
                    session.limits.max_lifetime,
                ),
            ] {
                if asked.is_some() && asked != have {
                    return Err(SessionError::LimitChange {
                        vm_id: vm_id.to_owned(),
                        field,
                        have: have.map_or("none".into(), |d| {
                            format!("{field} {}", crate::session::duration_text(d))
                        }),
                    });
                }
            }
            // Any earlier change of this VM finished (and was written) before we got the lock.
            // An expired token is renewed by the open (the platform asks for a working URL).
            let old_token = session
                .token()
                .is_expired()
                .then(|| session.replace_token(SessionToken::issue(self.ctx.token_ttl)));
            let retarget = session.retarget(target.clone());
            if retarget.is_none() && old_token.is_none() {
                return Ok((session, Opened::Unchanged));
            }
            let retargeted = retarget.is_some();
            // Whoever comes first takes it: the writer to undo, or we to finish.
            let undo = Arc::new(Mutex::new(Some((retarget, old_token))));
            let (back, on_fail) = (Arc::clone(&session), Arc::clone(&undo));
            let rollback = Box::new(move || {
                if let Some((retarget, old_token)) = lock(&on_fail).take() {
                    if let Some(u) = retarget {
                        back.restore_target(u);
                    }
                    if let Some(t) = old_token {
                        back.replace_token(t);
                    }
                }
            });
            if let Err(err) = self.committer.commit(rollback).await {
                return Err(SessionError::Coordination(err));
            }
            // Only now, with the new target on disk, do old viewers go.
            if let Some((Some(u), _)) = lock(&undo).take() {
                u.old_cancel.cancel();
            }
            if !retargeted {
                events::token_rotated(vm_id, session.port, false, true);
                return Ok((session, Opened::Unchanged));
            }
            events::session_retargeted(vm_id, session.port, &target);
            return Ok((session, Opened::Retargeted));
        }
        if !create {
            return Err(SessionError::NotFound(vm_id.to_owned()));
        }
        let session = self.start_session(
            vm_id,
            target.clone(),
            SessionToken::issue(self.ctx.token_ttl),
            wall_now(),
            limits,
            if self.ctx.session_ports {
                PortChoice::Any
            } else {
                PortChoice::None { capped: true }
            },
        )?;
        let (table, gone) = (Arc::clone(&self.by_vm), Arc::clone(&session));
        let rollback = Box::new(move || {
            table.remove_if(&gone.vm_id, |_, s| Arc::ptr_eq(s, &gone));
            gone.begin_stop();
        });
        if let Err(err) = self.committer.commit(rollback).await {
            // Out of the table already; wait for the port to be free.
            session.stop().await;
            return Err(SessionError::Coordination(err));
        }
        self.watch_lifetime(&session);
        events::session_opened(vm_id, session.port, &target);
        Ok((session, Opened::Created))
    }

    /// Issues `vm_id` a new token (`POST /v1/sessions/{vm_id}/token`): the old one stops
    /// admitting new connections at once; with `disconnect`, live viewers are closed with 1008
    /// `token revoked` once the new token is on disk. A failed write keeps the old token.
    pub async fn rotate_token(
        &self,
        vm_id: &str,
        disconnect: bool,
    ) -> Result<Arc<Session>, SessionError> {
        let _guard = self.lock_vm(vm_id).await;
        let session = self
            .get(vm_id)
            .ok_or_else(|| SessionError::NotFound(vm_id.to_owned()))?;
        let old = session.replace_token(SessionToken::issue(self.ctx.token_ttl));
        let undo = Arc::new(Mutex::new(Some(old)));
        let (back, on_fail) = (Arc::clone(&session), Arc::clone(&undo));
        let rollback = Box::new(move || {
            if let Some(old) = lock(&on_fail).take() {
                back.replace_token(old);
            }
        });
        if let Err(err) = self.committer.commit(rollback).await {
            return Err(SessionError::Coordination(err));
        }
        lock(&undo).take();
        if disconnect {
            session.revoke_viewers();
        }
        events::token_rotated(vm_id, session.port, disconnect, false);
        Ok(session)
    }
}
