//! Per-job credentials for the LLM gateway on the local backend.
//!
//! A credential is `oats-job.<job id>.<MAC>`, where the MAC is HMAC-SHA256 of the id under a key
//! this server drew at start. It proves which job is calling without any table to keep; it dies
//! with the job because the gateway honours it only while the job is unfinished, and with the
//! server because the next one draws a new key.

use super::JobId;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

const PREFIX: &str = "oats-job.";

/// Mints and checks the credentials agents present to the gateway.
pub struct AgentCredentials {
    key: [u8; 32],
}

impl AgentCredentials {
    /// A fresh random key.
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Self { key }
    }

    fn mac(&self, id: &JobId) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_str().as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The credential of job `id`.
    pub fn mint(&self, id: &JobId) -> String {
        format!("{PREFIX}{id}.{}", URL_SAFE_NO_PAD.encode(self.mac(id)))
    }

    /// The job a credential was minted for, if this server minted it.
    pub fn verify(&self, credential: &str) -> Option<JobId> {
        let rest = credential.strip_prefix(PREFIX)?;
        let (id, mac) = rest.split_once('.')?;
        let id = JobId::parse(id).ok()?;
        let given = URL_SAFE_NO_PAD.decode(mac).ok()?;
        bool::from(given.ct_eq(&self.mac(&id))).then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_names_its_job_and_nothing_else_passes() {
        let credentials = AgentCredentials::random();
        let id = JobId::random();
        let minted = credentials.mint(&id);
        assert_eq!(credentials.verify(&minted), Some(id.clone()));
        let other = JobId::random();
        let forged = minted.replace(id.as_str(), other.as_str());
        assert_eq!(credentials.verify(&forged), None);
        assert_eq!(AgentCredentials::random().verify(&minted), None, "another server's key");
        for junk in ["", "oats-job.", "Bearer x", "oats-job.job-x.abc"] {
            assert_eq!(credentials.verify(junk), None);
        }
    }
}
