//! A database outage the server sees for real.

/// A TCP proxy in front of the test PostgreSQL that can be cut (every connection dropped and new
/// ones refused) and restored, so the server sees a real database outage.
pub struct Outage {
    address: std::net::SocketAddr,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<tokio::sync::Notify>,
}

impl Outage {
    /// A proxy before the PostgreSQL server of `url`, and the URL that goes through it.
    pub async fn before_postgres(url: &str) -> (Self, String) {
        let (head, tail) = url.rsplit_once('@').expect("a URL with a user");
        let (host_port, database) = tail.split_once('/').expect("a URL with a database");
        let outage = Self::in_front_of(host_port.to_owned()).await;
        let proxied = format!("{head}@{}/{database}", outage.address);
        (outage, proxied)
    }

    pub async fn in_front_of(upstream: String) -> Self {
        use std::sync::{Arc, atomic::Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (down_flag, cut_signal) = (down.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if down_flag.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let (upstream, cut) = (upstream.clone(), cut_signal.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = cut.notified() => {}
                    }
                });
            }
        });
        Self { address, down, cut }
    }

    pub fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    pub fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
