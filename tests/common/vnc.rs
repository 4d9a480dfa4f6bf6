//! Real VNC servers for tests: Xvnc (TigerVNC) and QEMU, each on a unix socket in a private
//! directory, killed by PID on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::rfb::{Screen, Transport, read_screen};

/// Under `CI=true` a missing tool fails the test; elsewhere the test is skipped with a note.
/// Returns false when the test should be skipped.
pub fn require(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            if t.starts_with('/') || t.contains('/') {
                !Path::new(t).exists()
            } else {
                Command::new("sh")
                    .args(["-c", &format!("command -v {t}")])
                    .stdout(Stdio::null())
                    .status()
                    .map_or(true, |s| !s.success())
            }
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "missing {}: run `bash scripts/test.sh`, which installs them",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED (not under CI): {msg}");
    false
}

/// A child process killed (by PID) and reaped on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private directory for sockets and screenshots, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vncgate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn wait_for_socket(path: &Path, child: &mut Child, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early: {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not create {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads the screen directly until `ready` holds for two reads in a row that agree (the
/// picture has settled), within `limit`.
pub async fn settled_screen(
    socket: &Path,
    limit: Duration,
    ready: impl Fn(&Screen) -> bool,
) -> Screen {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last: Option<Screen> = None;
    loop {
        let Ok(s) = tokio::time::timeout(Duration::from_secs(10), async {
            read_screen(Transport::unix(socket).await).await
        })
        .await
        else {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no screen from {} in time",
                socket.display()
            );
            continue;
        };
        if ready(&s)
            && let Some(prev) = &last
            && (prev.width, prev.height) == (s.width, s.height)
            && super::rfb::diff(prev, &s).0 <= s.width * s.height / 1000
        {
            return s;
        }
        last = Some(s);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the screen of {} did not settle",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// The typing xterm's background: no other window has it, so tests can find the xterm.
pub const TERM_BG: &str = "#101820";
pub const TERM_BG_RGB: [u8; 3] = [0x10, 0x18, 0x20];

/// TigerVNC's Xvnc on a unix socket (no TCP port), with X clients drawn on it.
pub struct Xvnc {
    pub socket: PathBuf,
    pub display: String,
    // Field order is drop order: the X clients go before their server.
    clients: Vec<Proc>,
    _server: Proc,
}

impl Xvnc {
    pub async fn start(dir: &Path, desktop_name: &str) -> Xvnc {
        Self::launch(dir, desktop_name, &["-SecurityTypes", "None"]).await
    }

    /// Xvnc that asks for a VNC password.
    pub async fn start_with_password(dir: &Path, desktop_name: &str, password: &str) -> Xvnc {
        use std::io::Write;
        let file = dir.join("passwd");
        let mut child = Command::new("vncpasswd")
            .arg("-f")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start vncpasswd");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{password}\n").as_bytes())
            .expect("write the password");
        let out = child.wait_with_output().expect("vncpasswd");
        assert!(out.status.success(), "vncpasswd failed");
        std::fs::write(&file, out.stdout).expect("write the password file");
        let file = file.display().to_string();
        Self::launch(
            dir,
            desktop_name,
            &["-SecurityTypes", "VncAuth", "-PasswordFile", &file],
        )
        .await
    }

    async fn launch(dir: &Path, desktop_name: &str, security: &[&str]) -> Xvnc {
        let socket = dir.join("xvnc.sock");
        // A display number nobody uses; Xvnc refuses one whose lock exists, so try the next.
        // Locks left by X servers that were killed (SIGKILL skips their cleanup) count as free,
        // so they cannot pile up over runs and exhaust the range.
        for n in 0..200u32 {
            let display = 140 + (std::process::id() % 400) + n;
            if !display_free(display) {
                continue;
            }
            let child = Command::new("Xvnc")
                .arg(format!(":{display}"))
                .args([
                    "-rfbport",
                    "-1",
                    "-geometry",
                    "800x600",
                    "-depth",
                    "24",
                    "-nolisten",
                    "tcp",
                ])
                .args(security)
                .arg("-rfbunixpath")
                .arg(&socket)
                .arg("-desktop")
                .arg(desktop_name)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start Xvnc");
            let mut server = Proc(child);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            let mut ok = true;
            while !socket.exists() {
                if let Ok(Some(_)) = server.0.try_wait() {
                    ok = false;
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "Xvnc did not create its socket"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if ok {
                return Xvnc {
                    socket,
                    display: format!(":{display}"),
                    clients: Vec::new(),
                    _server: server,
                };
            }
        }
        panic!("no free X display for Xvnc");
    }

    /// Runs an X client on this display.
    pub fn client(&mut self, program: &str, args: &[&str]) {
        let child = Command::new(program)
            .args(args)
            .env("DISPLAY", &self.display)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        self.clients.push(Proc(child));
    }

    /// Waits for a client that runs to completion (e.g. xsetroot).
    pub fn run(&self, program: &str, args: &[&str]) {
        let status = Command::new(program)
            .args(args)
            .env("DISPLAY", &self.display)
            .status()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(status.success(), "{program} failed: {status}");
    }

    /// The test desktop: a blue root window, colour blocks, and a black xterm over the centre
    /// (the pointer starts there, so it has the keyboard). Returns the xterm's screen.
    pub async fn draw_desktop(&mut self) -> Screen {
        self.run("xsetroot", &["-solid", "#204080"]);
        for (bg, geometry) in [
            ("#e02020", "12x4+20+20"),
            ("#20c040", "12x4+620+20"),
            ("#e0c000", "12x4+20+480"),
            ("#c040c0", "12x4+620+480"),
        ] {
            self.client(
                "xterm",
                &[
                    "-bg",
                    bg,
                    "-fg",
                    bg,
                    "-geometry",
                    geometry,
                    "-e",
                    "sleep 3600",
                ],
            );
        }
        self.client(
            "xterm",
            &[
                "-bg",
                TERM_BG,
                "-fg",
                "white",
                "-geometry",
                "50x12+220+220",
                "-e",
                "sh",
            ],
        );
        settled_screen(&self.socket, Duration::from_secs(20), |s| {
            super::rfb::colour_count(s) >= 6
        })
        .await
    }
}

/// QEMU with no disk, showing SeaBIOS's boot prompt on a unix-socket VNC server.
pub struct Qemu {
    pub socket: PathBuf,
    _proc: Proc,
}

impl Qemu {
    pub async fn start(dir: &Path) -> Qemu {
        let socket = dir.join("qemu.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(["-display", "none", "-m", "64", "-nic", "none", "-no-reboot"])
            // The boot prompt stays for 60 s, so the screen is still while it is compared.
            .args(["-boot", "menu=on,splash-time=60000"])
            .arg("-vnc")
            .arg(format!("unix:{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64");
        let mut proc = Proc(child);
        wait_for_socket(&socket, &mut proc.0, "qemu").await;
        Qemu {
            socket,
            _proc: proc,
        }
    }
}

/// Whether display `:n` can be given to a new Xvnc. A lock whose process is gone is stale:
/// the display is free, and Xvnc replaces the lock and the socket itself (the X server's own
/// stale-lock check). Nothing is deleted here: another test thread may be starting an Xvnc on
/// the same display right now.
fn display_free(n: u32) -> bool {
    match std::fs::read_to_string(format!("/tmp/.X{n}-lock")) {
        // An X server writes its lock under another name and links it into place, so the pid
        // is always there; anything unreadable is left alone.
        Ok(text) => text
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => false,
        Err(_) => !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists(),
    }
}

impl Drop for Xvnc {
    /// Stops the X clients, then the server with SIGTERM so it removes its lock and sockets
    /// (SIGKILL, the fallback after 5 s, would leave them behind).
    fn drop(&mut self) {
        self.clients.clear();
        let pid = self._server.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) | Err(_) = self._server.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
