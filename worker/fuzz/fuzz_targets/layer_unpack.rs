//! `layer_unpack`: the layer unpacker against a model of SECURITY.md's rules.
//!
//! The input decodes (with `arbitrary`) into up to 16 entries: a path built
//! from a few names, `.`, `..`, empty parts, whiteout prefixes and raw bytes,
//! a kind (file, directory, symlink, hardlink, whiteout, opaque whiteout,
//! character or block device, fifo), a link target (relative, absolute, or
//! the absolute path of a canary directory beside the target), contents,
//! mode and owner, and how the name travels (the header, a GNU long name, a
//! PAX `path`). That becomes a tar stream, unpacked by `unpack_layer` with
//! small caps (12 entries, 48 bytes a file, 400 bytes in all) into a fresh
//! temporary directory `target`, beside a `canary` tree.
//!
//! The model replays the same entries on an in-memory tree (directories in
//! an arena with parent links, inodes shared by hardlinks) under these rules:
//!
//! - names as tar carries them: a header field ends at its first NUL, a GNU
//!   long name loses its trailing NULs, a PAX value holding a newline is
//!   malformed; a NUL left in a name or link, an empty link, an absolute
//!   name or a `..` component is an error; `.` and empty parts vanish, and
//!   no parts names the root, which only a directory may;
//! - each entry's parent is resolved like `openat2(RESOLVE_IN_ROOT)`:
//!   symlinks are followed, absolute ones and `..` clamped to the root, 40
//!   links at most; missing parents are created 0755 one level at a time,
//!   and a parent that is not a directory, dangling or looping is an error;
//! - the final name is never followed: a file, symlink, fifo or whiteout
//!   replaces whatever is there (a directory with its whole tree); a
//!   directory keeps an existing directory and replaces anything else;
//! - a hardlink names a non-directory of this layer, resolved the same way
//!   (its parent followed, the last part not): it shares that inode, or is
//!   an error;
//! - `.wh.NAME` becomes a character device 0:0 (mode 0, owned by the
//!   unpacking root) replacing `NAME`; `.wh.`, `.wh..` and `.wh...` are
//!   errors; `.wh..wh..opq` marks its directory with
//!   `trusted.overlay.opaque=y`; other `.wh..wh.*` parts are skipped; a
//!   `.wh.` parent is an error; devices are skipped;
//! - in a set-group-ID directory, what the unpacker creates without setting
//!   an owner (missing parents, whiteout devices) takes the directory's
//!   group, and a missing parent the bit too (mkdir(2), mknod(2)); entries
//!   get their own owner, then their exact mode (fchmod after fchown), so an
//!   explicit directory entry does not inherit the bit;
//! - more than 12 members, a member over 48 bytes, or more than 400 bytes of
//!   members and extension headers is an error.
//!
//! The check: when `unpack_layer` fails, the model must fail too (and the
//! other way round); when both succeed, the trees must be equal: every
//! path's type, mode, owner, contents or link text, opaque mark, link count,
//! and which paths share an inode (times are not compared: unit tests cover
//! them). In every case the canary tree and the base directory must be
//! exactly as before, down to ctimes, so nothing outside `target` was
//! created, changed or removed.
//!
//! `fuzz/seeds/layer_unpack/` holds inputs at boundaries that coverage may
//! not tell apart, kept out of the corpus so that `cargo fuzz cmin` cannot
//! drop them: 40 and 41 symlinks in one resolution, a hardlink to itself, a
//! repeated hardlink (two-minute runs with the model wrong at either did
//! not notice).
#![no_main]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use quilt::image::{unpack_layer, Compression, UnpackLimits};

const LIMITS: UnpackLimits = UnpackLimits { max_file_bytes: 48, max_total_bytes: 400, max_entries: 12 };
/// Entries and parts beyond these are dropped, to keep inputs small.
const MAX_GENERATED_ENTRIES: usize = 16;
const MAX_PARTS: usize = 6;
const MAX_RAW_PART: usize = 20;
const MAX_CONTENTS: usize = 64;
/// Linux's MAXSYMLINKS: links followed in one resolution.
const MAX_SYMLINKS: usize = 40;
const HEADER_FIELD: usize = 100;
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

#[derive(Debug, Arbitrary)]
struct Layer {
    entries: Vec<Entry>,
}

#[derive(Debug, Arbitrary)]
struct Entry {
    name: Name,
    kind: Kind,
    mode: u16,
    owner: u8,
    encoding: Encoding,
}

/// How a name longer than nothing travels; names over 100 bytes never use
/// the header field.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Encoding {
    Header,
    GnuLongName,
    Pax,
}

#[derive(Debug, Arbitrary)]
struct Name {
    absolute: bool,
    trailing_slash: bool,
    parts: Vec<Part>,
}

#[derive(Debug, Arbitrary)]
enum Part {
    A,
    B,
    C,
    Dot,
    DotDot,
    Empty,
    /// `canary`: the sibling of the target, reached with `..`.
    Canary,
    Whiteout,
    Opaque,
    AufsMeta,
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Target {
    Name(Name),
    /// The canary directory's absolute path, then this name.
    Canary(Name),
}

#[derive(Debug, Arbitrary)]
enum Kind {
    File {
        contents: Vec<u8>,
        flag: FileFlag,
    },
    Directory,
    Symlink(Target),
    Hardlink(Target),
    /// The name's last part gets the `.wh.` prefix.
    Whiteout,
    /// `.wh..wh..opq` is appended to the name.
    OpaqueWhiteout,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// Type flags of a regular file: `0`, the old `\0` (a directory when the
/// name ends in `/`), and `7` (contiguous).
#[derive(Debug, Clone, Copy, Arbitrary)]
enum FileFlag {
    Zero,
    Nul,
    Contiguous,
}

impl Name {
    fn parts(&self) -> Vec<Vec<u8>> {
        self.parts
            .iter()
            .take(MAX_PARTS)
            .map(|part| match part {
                Part::A => b"a".to_vec(),
                Part::B => b"b".to_vec(),
                Part::C => b"c".to_vec(),
                Part::Dot => b".".to_vec(),
                Part::DotDot => b"..".to_vec(),
                Part::Empty => Vec::new(),
                Part::Canary => b"canary".to_vec(),
                Part::Whiteout => b".wh.a".to_vec(),
                Part::Opaque => b".wh..wh..opq".to_vec(),
                Part::AufsMeta => b".wh..wh.plnk".to_vec(),
                Part::Raw(bytes) => bytes.iter().copied().take(MAX_RAW_PART).collect(),
            })
            .collect()
    }

    fn render(&self, parts: &[Vec<u8>]) -> Vec<u8> {
        let mut text = if self.absolute { b"/".to_vec() } else { Vec::new() };
        text.extend(parts.join(&b'/'));
        if self.trailing_slash {
            text.push(b'/');
        }
        text
    }
}

/// A member as the unpacker will see it, plus how it is written.
struct Member {
    /// The name bytes written, and how.
    written_name: Vec<u8>,
    encoding: Encoding,
    type_flag: u8,
    /// The link text written (symlinks and hardlinks).
    written_link: Option<Vec<u8>>,
    mode: u32,
    uid: u32,
    gid: u32,
    contents: Vec<u8>,
}

fn members(layer: &Layer, canary: &[u8]) -> Vec<Member> {
    layer
        .entries
        .iter()
        .take(MAX_GENERATED_ENTRIES)
        .map(|entry| {
            let mut parts = entry.name.parts();
            match entry.kind {
                Kind::Whiteout => match parts.last_mut() {
                    Some(last) => *last = [b".wh.".as_slice(), last].concat(),
                    None => parts.push(b".wh.".to_vec()),
                },
                Kind::OpaqueWhiteout => parts.push(b".wh..wh..opq".to_vec()),
                _ => {}
            }
            let name = entry.name.render(&parts);
            let link = |target: &Target| match target {
                Target::Name(name) => name.render(&name.parts()),
                Target::Canary(name) => {
                    let mut text = canary.to_vec();
                    text.push(b'/');
                    text.extend(name.render(&name.parts()));
                    text
                }
            };
            let (type_flag, written_link, contents) = match &entry.kind {
                Kind::File { contents, flag } => (
                    match flag {
                        FileFlag::Zero => b'0',
                        FileFlag::Nul => b'\0',
                        FileFlag::Contiguous => b'7',
                    },
                    None,
                    contents.iter().copied().take(MAX_CONTENTS).collect(),
                ),
                Kind::Directory => (b'5', None, Vec::new()),
                Kind::Symlink(target) => (b'2', Some(link(target)), Vec::new()),
                Kind::Hardlink(target) => (b'1', Some(link(target)), Vec::new()),
                Kind::Whiteout | Kind::OpaqueWhiteout => (b'0', None, Vec::new()),
                Kind::CharDevice => (b'3', None, Vec::new()),
                Kind::BlockDevice => (b'4', None, Vec::new()),
                Kind::Fifo => (b'6', None, Vec::new()),
            };
            let encoding = match entry.encoding {
                Encoding::Header if name.len() > HEADER_FIELD => Encoding::GnuLongName,
                encoding => encoding,
            };
            let ids = [0, 1, 1000, 65534];
            Member {
                written_name: name,
                encoding,
                type_flag,
                written_link,
                mode: u32::from(entry.mode),
                uid: ids[usize::from(entry.owner & 3)],
                gid: ids[usize::from((entry.owner >> 2) & 3)],
                contents,
            }
        })
        .collect()
}

/// One PAX record: `<length> <key>=<value>\n`, the length counting itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let base = key.len() + value.len() + 3;
    let mut length = base + 1;
    while base + length.to_string().len() != length {
        length += 1;
    }
    let mut record = format!("{length} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

fn header(name: &[u8], type_flag: u8, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    let field = &mut header.as_old_mut().name;
    let length = name.len().min(HEADER_FIELD);
    field[..length].copy_from_slice(&name[..length]);
    header.as_old_mut().linkflag[0] = type_flag;
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_600_000_000);
    header
}

fn append(builder: &mut tar::Builder<Vec<u8>>, mut header: tar::Header, data: &[u8]) {
    header.set_cksum();
    builder.append(&header, data).expect("writing to a Vec");
}

fn tar_stream(members: &[Member]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for member in members {
        match member.encoding {
            Encoding::Header => {}
            Encoding::GnuLongName => {
                let mut body = member.written_name.clone();
                body.push(0);
                append(&mut builder, header(b"././@LongLink", b'L', body.len() as u64), &body);
            }
            Encoding::Pax => {
                let body = pax_record("path", &member.written_name);
                append(&mut builder, header(b"PaxHeader", b'x', body.len() as u64), &body);
            }
        }
        let mut entry = header(&member.written_name, member.type_flag, member.contents.len() as u64);
        if let Some(link) = &member.written_link {
            if link.len() > HEADER_FIELD {
                let mut body = link.clone();
                body.push(0);
                append(&mut builder, header(b"././@LongLink", b'K', body.len() as u64), &body);
            }
            let length = link.len().min(HEADER_FIELD);
            entry.as_old_mut().linkname[..length].copy_from_slice(&link[..length]);
        }
        entry.set_mode(member.mode);
        entry.set_uid(u64::from(member.uid));
        entry.set_gid(u64::from(member.gid));
        if matches!(member.type_flag, b'3' | b'4') {
            entry.set_device_major(8).expect("a GNU header has device fields");
            entry.set_device_minor(1).expect("a GNU header has device fields");
        }
        append(&mut builder, entry, &member.contents);
    }
    builder.into_inner().expect("writing to a Vec")
}

// ---------------------------------------------------------------- the model

type DirectoryId = usize;
type InodeId = usize;
const ROOT: DirectoryId = 0;

#[derive(Clone, Copy)]
enum Child {
    Directory(DirectoryId),
    Leaf(InodeId),
}

struct Directory {
    parent: DirectoryId,
    children: BTreeMap<Vec<u8>, Child>,
    mode: u32,
    uid: u32,
    gid: u32,
    opaque: bool,
}

enum Content {
    File(Vec<u8>),
    Symlink(Vec<u8>),
    Fifo,
    /// The overlay whiteout, a 0:0 character device.
    Whiteout,
}

struct Inode {
    content: Content,
    mode: u32,
    uid: u32,
    gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolve {
    NotFound,
    NotDirectory,
    Loop,
}

/// Why the model refuses a layer (for the failure message only).
type Refusal = String;

struct Model {
    directories: Vec<Directory>,
    inodes: Vec<Inode>,
}

impl Model {
    fn new(root_mode: u32) -> Model {
        let root = Directory {
            parent: ROOT,
            children: BTreeMap::new(),
            mode: root_mode,
            uid: 0,
            gid: 0,
            opaque: false,
        };
        Model { directories: vec![root], inodes: Vec::new() }
    }

    fn child(&self, directory: DirectoryId, name: &[u8]) -> Option<Child> {
        self.directories[directory].children.get(name).copied()
    }

    /// `openat2(root, path, O_DIRECTORY, RESOLVE_IN_ROOT)`: every symlink
    /// followed, the last one too.
    fn resolve_directory(&self, parts: &[Vec<u8>]) -> Result<DirectoryId, Resolve> {
        let mut pending: VecDeque<Vec<u8>> = parts.iter().cloned().collect();
        let mut current = ROOT;
        let mut links = 0;
        while let Some(part) = pending.pop_front() {
            match part.as_slice() {
                b"" | b"." => {}
                b".." => current = self.directories[current].parent,
                name => match self.child(current, name) {
                    None => return Err(Resolve::NotFound),
                    Some(Child::Directory(directory)) => current = directory,
                    Some(Child::Leaf(inode)) => match &self.inodes[inode].content {
                        Content::Symlink(text) => {
                            links += 1;
                            if links > MAX_SYMLINKS {
                                return Err(Resolve::Loop);
                            }
                            if text.starts_with(b"/") {
                                current = ROOT;
                            }
                            for part in text.split(|&byte| byte == b'/').rev() {
                                pending.push_front(part.to_vec());
                            }
                        }
                        _ => return Err(Resolve::NotDirectory),
                    },
                },
            }
        }
        Ok(current)
    }

    /// The unpacker's `open_directory`: resolve, and on ENOENT create the
    /// missing levels one at a time (an existing name, a dangling symlink
    /// say, is left as it is), then resolve again.
    fn open_directory(&mut self, parts: &[Vec<u8>]) -> Result<DirectoryId, Refusal> {
        match self.resolve_directory(parts) {
            Ok(directory) => return Ok(directory),
            Err(Resolve::NotFound) => {}
            Err(error) => return Err(format!("parent {:?}: {error:?}", show(parts))),
        }
        for depth in 1..=parts.len() {
            match self.resolve_directory(&parts[..depth]) {
                Ok(_) => continue,
                Err(Resolve::NotFound) => {}
                Err(error) => return Err(format!("parent level {depth}: {error:?}")),
            }
            let parent = self
                .resolve_directory(&parts[..depth - 1])
                .map_err(|error| format!("parent level {}: {error:?}", depth - 1))?;
            let name = &parts[depth - 1];
            if self.child(parent, name).is_none() {
                // mkdir(2) in a set-group-ID directory: its group, and the bit.
                let (mode, gid) = match self.set_group_id(parent) {
                    Some(gid) => (0o2755, gid),
                    None => (0o755, 0),
                };
                self.make_directory(parent, name, mode, 0, gid);
            }
        }
        self.resolve_directory(parts).map_err(|error| format!("parent {:?}: {error:?}", show(parts)))
    }

    /// The group a new object takes in `directory` when that has the
    /// set-group-ID bit (see mkdir(2), mknod(2)).
    fn set_group_id(&self, directory: DirectoryId) -> Option<u32> {
        let directory = &self.directories[directory];
        (directory.mode & 0o2000 != 0).then_some(directory.gid)
    }

    fn make_directory(
        &mut self,
        parent: DirectoryId,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> DirectoryId {
        let id = self.directories.len();
        self.directories.push(Directory { parent, children: BTreeMap::new(), mode, uid, gid, opaque: false });
        self.directories[parent].children.insert(name.to_vec(), Child::Directory(id));
        id
    }

    fn add_leaf(&mut self, parent: DirectoryId, name: &[u8], inode: Inode) {
        let id = self.inodes.len();
        self.inodes.push(inode);
        self.directories[parent].children.insert(name.to_vec(), Child::Leaf(id));
    }

    /// Removes a name, a directory with everything below it.
    fn remove(&mut self, parent: DirectoryId, name: &[u8]) {
        if let Some(Child::Directory(directory)) = self.directories[parent].children.remove(name) {
            self.empty(directory);
        }
    }

    fn empty(&mut self, directory: DirectoryId) {
        for (_, child) in std::mem::take(&mut self.directories[directory].children) {
            if let Child::Directory(below) = child {
                self.empty(below);
            }
        }
    }

    /// Applies one member: `Ok` when the unpacker goes on to the next one.
    fn apply(&mut self, member: &Member, budget: &mut u64, count: &mut u64) -> Result<(), Refusal> {
        // The name and link as the tar parser delivers them.
        let name = match member.encoding {
            Encoding::Header => until_nul(&member.written_name),
            Encoding::GnuLongName => trim_trailing_nuls(&member.written_name),
            Encoding::Pax if member.written_name.contains(&b'\n') => {
                return Err("PAX record with a newline".into())
            }
            Encoding::Pax => member.written_name.clone(),
        };
        match member.encoding {
            Encoding::Header => {}
            Encoding::GnuLongName => charge(budget, member.written_name.len() as u64 + 1)?,
            Encoding::Pax => charge(budget, pax_record("path", &member.written_name).len() as u64)?,
        }
        let link = match &member.written_link {
            None => None,
            Some(link) if link.len() > HEADER_FIELD => {
                charge(budget, link.len() as u64 + 1)?;
                Some(trim_trailing_nuls(link))
            }
            Some(link) => Some(until_nul(link)),
        };
        *count += 1;
        if *count > LIMITS.max_entries {
            return Err("too many entries".into());
        }
        if link.as_ref().is_some_and(|link| link.is_empty() || link.contains(&0)) {
            return Err("empty link or NUL in it".into());
        }
        let is_directory = member.type_flag == b'5' || (member.type_flag == 0 && name.ends_with(b"/"));
        if name.contains(&0) {
            return Err("NUL in the name".into());
        }
        let parts = normalise(&name)?;
        if parts.is_empty() && !is_directory {
            return Err("only a directory may name the root".into());
        }
        let size = member.contents.len() as u64;
        if size > LIMITS.max_file_bytes {
            return Err("file over the per-file cap".into());
        }
        charge(budget, size)?;
        let (mode, uid, gid) = (member.mode & 0o7777, member.uid, member.gid);

        let Some((last, parents)) = parts.split_last() else {
            let root = &mut self.directories[ROOT];
            (root.mode, root.uid, root.gid) = (mode, uid, gid);
            return Ok(());
        };
        if parts.iter().any(|part| part.starts_with(b".wh..wh.")) && last != b".wh..wh..opq" {
            return Ok(());
        }
        if parents.iter().any(|part| part.starts_with(b".wh.")) {
            return Err("whiteout used as a directory".into());
        }
        if last == b".wh..wh..opq" {
            let directory = self.open_directory(parents)?;
            self.directories[directory].opaque = true;
            return Ok(());
        }
        if let Some(hidden) = last.strip_prefix(b".wh.") {
            if matches!(hidden, b"" | b"." | b"..") {
                return Err("whiteout of no sibling".into());
            }
            let parent = self.open_directory(parents)?;
            self.remove(parent, hidden);
            let gid = self.set_group_id(parent).unwrap_or(0);
            self.add_leaf(parent, hidden, Inode { content: Content::Whiteout, mode: 0, uid: 0, gid });
            return Ok(());
        }
        if matches!(member.type_flag, b'3' | b'4') {
            return Ok(());
        }
        let parent = self.open_directory(parents)?;
        match member.type_flag {
            _ if is_directory => match self.child(parent, last) {
                Some(Child::Directory(directory)) => {
                    let directory = &mut self.directories[directory];
                    (directory.mode, directory.uid, directory.gid) = (mode, uid, gid);
                }
                _ => {
                    self.remove(parent, last);
                    self.make_directory(parent, last, mode, uid, gid);
                }
            },
            b'0' | b'7' | 0 => {
                self.remove(parent, last);
                let content = Content::File(member.contents.clone());
                self.add_leaf(parent, last, Inode { content, mode, uid, gid });
            }
            b'2' => {
                self.remove(parent, last);
                let content = Content::Symlink(link.expect("a symlink has a link"));
                self.add_leaf(parent, last, Inode { content, mode: 0o777, uid, gid });
            }
            b'6' => {
                self.remove(parent, last);
                self.add_leaf(parent, last, Inode { content: Content::Fifo, mode, uid, gid });
            }
            b'1' => {
                let source =
                    normalise(&link.expect("a hardlink has a link")).map_err(|_| "hardlink escapes")?;
                let Some((source_name, source_parents)) = source.split_last() else {
                    return Err("hardlink to the root".into());
                };
                let source_parent = self
                    .resolve_directory(source_parents)
                    .map_err(|error| format!("hardlink source parent: {error:?}"))?;
                let inode = match self.child(source_parent, source_name) {
                    Some(Child::Leaf(inode)) => inode,
                    Some(Child::Directory(_)) => return Err("hardlink to a directory".into()),
                    None => return Err("hardlink source missing".into()),
                };
                if let Some(Child::Leaf(existing)) = self.child(parent, last) {
                    if existing == inode {
                        return Ok(());
                    }
                }
                self.remove(parent, last);
                // Removing the old entry may have removed the source.
                match self.child(source_parent, source_name) {
                    Some(Child::Leaf(again)) if again == inode => {}
                    _ => return Err("hardlink source removed by its own entry".into()),
                }
                self.directories[parent].children.insert(last.clone(), Child::Leaf(inode));
            }
            other => unreachable!("type flag {other} is not generated"),
        }
        Ok(())
    }

    /// One line per path, depth first in name order (see [`describe_real`]).
    fn describe(&self) -> String {
        let mut counts: HashMap<InodeId, usize> = HashMap::new();
        self.count_links(ROOT, &mut counts);
        let root = &self.directories[ROOT];
        let mut out = directory_line(b"", root.mode, root.uid, root.gid, root.opaque);
        let mut first = HashMap::new();
        self.describe_directory(ROOT, b"", &counts, &mut first, &mut out);
        out
    }

    fn count_links(&self, directory: DirectoryId, counts: &mut HashMap<InodeId, usize>) {
        for child in self.directories[directory].children.values() {
            match child {
                Child::Directory(below) => self.count_links(*below, counts),
                Child::Leaf(inode) => *counts.entry(*inode).or_default() += 1,
            }
        }
    }

    fn describe_directory(
        &self,
        directory: DirectoryId,
        prefix: &[u8],
        counts: &HashMap<InodeId, usize>,
        first: &mut HashMap<InodeId, Vec<u8>>,
        out: &mut String,
    ) {
        for (name, child) in &self.directories[directory].children {
            let path = [prefix, b"/", name].concat();
            match child {
                Child::Directory(below) => {
                    let below_directory = &self.directories[*below];
                    let (mode, uid, gid) = (below_directory.mode, below_directory.uid, below_directory.gid);
                    out.push_str(&directory_line(&path, mode, uid, gid, below_directory.opaque));
                    self.describe_directory(*below, &path, counts, first, out);
                }
                Child::Leaf(inode) => {
                    let canonical = first.entry(*inode).or_insert_with(|| path.clone()).clone();
                    let node = &self.inodes[*inode];
                    let kind = match &node.content {
                        Content::File(contents) => LeafKind::File(contents.clone()),
                        Content::Symlink(text) => LeafKind::Symlink(text.clone()),
                        Content::Fifo => LeafKind::Fifo,
                        Content::Whiteout => LeafKind::CharDevice(0),
                    };
                    out.push_str(&leaf_line(
                        &path,
                        &kind,
                        node.mode,
                        node.uid,
                        node.gid,
                        counts[inode],
                        &canonical,
                    ));
                }
            }
        }
    }
}

fn charge(budget: &mut u64, bytes: u64) -> Result<(), Refusal> {
    *budget += bytes;
    if *budget > LIMITS.max_total_bytes {
        return Err("over the total cap".into());
    }
    Ok(())
}

fn until_nul(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().copied().take_while(|&byte| byte != 0).collect()
}

fn trim_trailing_nuls(bytes: &[u8]) -> Vec<u8> {
    let end = bytes.iter().rposition(|&byte| byte != 0).map_or(0, |last| last + 1);
    bytes[..end].to_vec()
}

/// A tar name's parts: `.` and empty parts dropped; absolute or `..` refused.
fn normalise(name: &[u8]) -> Result<Vec<Vec<u8>>, Refusal> {
    if name.starts_with(b"/") {
        return Err("absolute name".into());
    }
    let mut parts = Vec::new();
    for part in name.split(|&byte| byte == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("'..' in a name".into()),
            part => parts.push(part.to_vec()),
        }
    }
    Ok(parts)
}

fn show(parts: &[Vec<u8>]) -> String {
    parts.join(&b'/').escape_ascii().to_string()
}

// ------------------------------------------------------- the tree on disk

enum LeafKind {
    File(Vec<u8>),
    Symlink(Vec<u8>),
    Fifo,
    CharDevice(u64),
    Other(&'static str),
}

fn directory_line(path: &[u8], mode: u32, uid: u32, gid: u32, opaque: bool) -> String {
    format!("{}/ dir {mode:o} {uid}:{gid} opaque={opaque}\n", path.escape_ascii())
}

fn leaf_line(
    path: &[u8],
    kind: &LeafKind,
    mode: u32,
    uid: u32,
    gid: u32,
    links: usize,
    first: &[u8],
) -> String {
    let kind = match kind {
        LeafKind::File(contents) => format!("file {mode:o} {:?}", contents.escape_ascii().to_string()),
        // A symlink's own mode is always 0777 and means nothing.
        LeafKind::Symlink(text) => format!("symlink -> {:?}", text.escape_ascii().to_string()),
        LeafKind::Fifo => format!("fifo {mode:o}"),
        LeafKind::CharDevice(device) => format!("char {device} {mode:o}"),
        LeafKind::Other(what) => format!("unexpected {what} {mode:o}"),
    };
    format!("{} {kind} {uid}:{gid} links={links} inode-of={}\n", path.escape_ascii(), first.escape_ascii())
}

/// The real tree in the model's format.
fn describe_real(root: &Path) -> String {
    let metadata = fs::symlink_metadata(root).expect("the target exists");
    let mut out =
        directory_line(b"", metadata.mode() & 0o7777, metadata.uid(), metadata.gid(), is_opaque(root));
    let mut first = HashMap::new();
    describe_real_directory(root, b"", &mut first, &mut out);
    out
}

fn describe_real_directory(
    directory: &Path,
    prefix: &[u8],
    first: &mut HashMap<(u64, u64), Vec<u8>>,
    out: &mut String,
) {
    let mut names: Vec<Vec<u8>> = fs::read_dir(directory)
        .expect("a directory of the target lists")
        .map(|entry| entry.expect("a directory entry").file_name().as_bytes().to_vec())
        .collect();
    names.sort();
    for name in names {
        let path = directory.join(OsStr::from_bytes(&name));
        let relative = [prefix, b"/", &name].concat();
        let metadata = fs::symlink_metadata(&path).expect("a listed entry exists");
        let kind = metadata.file_type();
        let (mode, uid, gid) = (metadata.mode() & 0o7777, metadata.uid(), metadata.gid());
        if kind.is_dir() {
            out.push_str(&directory_line(&relative, mode, uid, gid, is_opaque(&path)));
            describe_real_directory(&path, &relative, first, out);
            continue;
        }
        let canonical =
            first.entry((metadata.dev(), metadata.ino())).or_insert_with(|| relative.clone()).clone();
        let leaf = if kind.is_file() {
            LeafKind::File(fs::read(&path).expect("a file of the target reads"))
        } else if kind.is_symlink() {
            LeafKind::Symlink(
                fs::read_link(&path).expect("a symlink reads").into_os_string().into_encoded_bytes(),
            )
        } else if kind.is_fifo() {
            LeafKind::Fifo
        } else if kind.is_char_device() {
            LeafKind::CharDevice(metadata.rdev())
        } else if kind.is_block_device() {
            LeafKind::Other("block device")
        } else {
            LeafKind::Other("socket")
        };
        out.push_str(&leaf_line(&relative, &leaf, mode, uid, gid, metadata.nlink() as usize, &canonical));
    }
}

fn is_opaque(directory: &Path) -> bool {
    match xattr::get(directory, OPAQUE_XATTR).expect("reading an xattr of the target") {
        None => false,
        Some(value) if value == b"y" => true,
        Some(value) => panic!("{}: opaque xattr {value:?}", directory.display()),
    }
}

/// Everything under the base directory except the target, with ctimes:
/// what no layer may change.
fn describe_outside(base: &Path) -> String {
    let mut out = String::new();
    let mut pending = vec![base.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let mut entries: Vec<_> =
            fs::read_dir(&directory).expect("listing the base").map(|entry| entry.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            if path == base.join("target") {
                continue;
            }
            let metadata = fs::symlink_metadata(&path).expect("a listed entry exists");
            out.push_str(&format!(
                "{} {:o} {}:{} links={} size={} mtime={}.{} ctime={}.{}\n",
                path.display(),
                metadata.mode(),
                metadata.uid(),
                metadata.gid(),
                metadata.nlink(),
                metadata.size(),
                metadata.mtime(),
                metadata.mtime_nsec(),
                metadata.ctime(),
                metadata.ctime_nsec()
            ));
            if metadata.is_dir() {
                pending.push(path);
            }
        }
    }
    let base_metadata = fs::symlink_metadata(base).expect("the base exists");
    out.push_str(&format!(
        "base {:o} mtime={}.{}\n",
        base_metadata.mode(),
        base_metadata.mtime(),
        base_metadata.mtime_nsec()
    ));
    out
}

fuzz_target!(|layer: Layer| {
    // SAFETY: umask(2) only sets the process's file-creation mask; the model
    // assumes the usual 022 for the target and the directories created in it.
    unsafe { libc::umask(0o022) };
    let base =
        tempfile::Builder::new().prefix("quilt-fuzz-unpack-").tempdir().expect("a temporary directory");
    let target = base.path().join("target");
    let canary = base.path().join("canary");
    fs::create_dir(&target).expect("creating the target");
    fs::create_dir_all(canary.join("sub")).expect("creating the canary");
    fs::write(canary.join("secret"), b"host secret").expect("writing the canary");
    fs::write(canary.join("sub/file"), b"host file").expect("writing the canary");
    std::os::unix::fs::symlink("secret", canary.join("link")).expect("writing the canary");

    let members = members(&layer, canary.as_os_str().as_bytes());
    let stream = tar_stream(&members);
    let outside_before = describe_outside(base.path());
    let result = unpack_layer(stream.as_slice(), Compression::None, &target, &LIMITS);
    assert_eq!(
        outside_before,
        describe_outside(base.path()),
        "something outside the target changed ({result:?})"
    );

    let mut model = Model::new(0o755);
    let (mut budget, mut count) = (0, 0);
    let expected = members.iter().try_for_each(|member| model.apply(member, &mut budget, &mut count));
    if std::env::var_os("QUILT_FUZZ_TRACE").is_some() {
        eprintln!("unpack: {result:?}\nmodel: {expected:?}\n{}", describe_real(&target));
    }
    match (result, expected) {
        (Err(_), Err(_)) => {}
        (Ok(_), Err(refusal)) => {
            panic!("unpacked a layer the model refuses ({refusal}):\n{}", describe_real(&target))
        }
        (Err(error), Ok(())) => {
            panic!("refused a layer the model accepts: {error:?}\nmodel:\n{}", model.describe())
        }
        (Ok(_), Ok(())) => {
            let (real, modelled) = (describe_real(&target), model.describe());
            assert!(
                real == modelled,
                "the unpacked tree differs from the model\nreal:\n{real}\nmodel:\n{modelled}"
            );
        }
    }
});
